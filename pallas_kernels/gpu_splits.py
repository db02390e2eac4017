"""How many splits (flash-decoding ranges) a GPU decode step uses, and how big its grid is.

The rules `gpu_decode` sizes its kernels by: the grid's split axis is static (compiled per
bucket, computed on numpy), the splits a step uses are data (`split_count`, traced), enough to
fill one wave of resident programs.
"""

import jax.numpy as jnp
import numpy as np

NUM_SMS = 132  # H100 SXM; only used to size the split count

SMEM_PER_SM = 228 << 10  # H100: shared memory per SM, 1 KB of it reserved per resident program
MAX_PROGRAMS_PER_SM = 4  # 4-warp programs: about what the register file holds (an estimate)
MAX_SPLIT_PROGRAMS = 8 * NUM_SMS  # the most programs a grid gets for splits the data may not use
MAX_SPLITS = 32


def wave_size(tile_bytes: int, num_stages: int) -> int:
    """Programs the GPU runs at once: NUM_SMS times how many programs' pipeline buffers (K and
    V of one loop iteration, `tile_bytes`, per stage) fit an SM's shared memory."""
    per_sm = SMEM_PER_SM // (num_stages * tile_bytes + (1 << 10))
    return NUM_SMS * max(1, min(per_sm, MAX_PROGRAMS_PER_SM))


def num_splits_for(num_slots: int, num_kv_heads: int, pages_per_seq: int, pages_per_iter: int,
                   wave: int) -> int:
    """The grid's split axis: room for as many splits as one sequence alone would use
    (`split_count`) while the grid stays small, at least what a full grid uses. Never more
    splits than page groups."""
    programs, target = num_slots * num_kv_heads, max(wave, 2 * NUM_SMS)
    alone = min(max(1, target // num_kv_heads), MAX_SPLIT_PROGRAMS // programs)
    return max(1, min(max(target // programs, alone), -(-pages_per_seq // pages_per_iter), MAX_SPLITS))


def split_count(num_used, num_kv_heads: int, num_splits: int, wave: int, xp=jnp, min_splits: int = 1):
    """Splits the step uses (traced), at most the grid's `num_splits`: as many as fill one wave
    of resident programs (`wave_size`) and at least two programs per SM, never more, for the
    slots in use; but at least `min_splits` while the slots alone fill at most one wave (the
    chip's `min_splits_for`, where the step's sequences are long enough: `MIN_SPLITS_KEYS`). A second wave that is mostly empty leaves bandwidth idle; on the
    H100 at page 64 (bf16, Llama-3-8B heads):
    - 32 x 2k, 256 programs in a wave of 264: 1 split 0.102 ms, 2 splits 0.121, 4 splits 0.107;
    - 8 x 8k, 64 programs: 1 split 0.180 ms, 2 splits 0.109, 4 splits 0.103, 8 splits 0.105."""
    programs = xp.maximum(num_used, 1) * num_kv_heads
    splits = max(wave, 2 * NUM_SMS) // programs
    splits = xp.where(programs <= wave, xp.maximum(splits, min_splits), splits)
    return xp.clip(splits, 1, num_splits).astype(xp.int32)


# The fewest splits of a decode-only step whose sequences alone fill at most one wave and whose
# longest sequence holds MIN_SPLITS_KEYS keys or more, by chip (a device_kind prefix; 1 for
# others). The H200 has the H100's 132 SMs and 1.4x its bandwidth: there 32 sequences x 2k keys
# (256 programs, a wave of 264) took 0.081 ms with one split and 0.078 with a grid of two, x 8k
# 0.280 and 0.255-0.260 (three runs in two sessions agree), where on the H100 a second split
# cost 19% (above). Through this rule, whose grid keeps room for 4 splits (2 merged as empty),
# 32 x 8k takes 0.260 ms, but 32 x 2k 0.080-0.083, no better than one split. At 1k keys the op
# times the same either way, while the engine's batch-32 step took 6.53 ms with one split and
# 6.64 with two (the merge's launches): hence the threshold. At 64 sequences one split wins.
MIN_SPLITS_BY_CHIP = {"NVIDIA H200": 2}
MIN_SPLITS_KEYS = 2048


def min_splits_for(device_kind: str) -> int:
    return next((n for prefix, n in MIN_SPLITS_BY_CHIP.items() if device_kind.startswith(prefix)), 1)


def decode_only_programs(num_tokens: int, num_seqs_max: int, num_kv_heads: int, num_splits: int,
                         fixed_splits: int | None, wave: int, min_splits: int = 1) -> int:
    """The decode-only grid: every token's programs with one split; with several, the most any
    sequence count up to the bucket's uses (n x kv heads x `split_count(n)`). A batch-1 step in
    a 16-token bucket of an 8B model (8 KV heads, room for 8 splits, a wave of 264) launches 264
    programs, not 16 x 8 x 8 = 1,024 of which 64 work."""
    if num_splits == 1:
        return num_tokens * num_kv_heads
    n = np.arange(1, min(num_tokens, num_seqs_max) + 1)
    used = fixed_splits or split_count(n, num_kv_heads, num_splits, wave, xp=np, min_splits=min_splits)
    return int(np.max(n * num_kv_heads * used))
