"""What one engine step hands to the device: plain numpy arrays in NamedTuples.

The scheduler builds these on the host. The runner sends them as two buffers, `pack`ed end to end
(the forward's arrays, the sampler's): two host-to-device copies a step instead of twenty, which
took 0.04 ms off a batch-1 decode step on the H100 (benchmarks/results/h100_session16.md).
Every shape depends only on the token bucket T, the sequence slots S, `pages_per_seq` and the
history width W; per-sequence lengths and offsets are data. The runner picks S per bucket
(`ModelRunner.seq_slots`).
"""

from typing import NamedTuple

import numpy as np

MAX_BANNED = 16  # EOS ids plus stop_token_ids a request may hold back while under min_tokens


class AttentionMetadata(NamedTuple):
    """Where each scheduled token sits. Sequences i >= num_seqs[0] and tokens t >= cu_q_lens[num_seqs]
    are padding: they write nothing into the cache and their outputs are ignored."""

    positions: np.ndarray  # [T] int32, position of each token in its sequence
    kv_lens: np.ndarray  # [S] int32, sequence length after this step (cached + new tokens)
    page_indices: np.ndarray  # [S, pages_per_seq] int32, the sequence's pages in order
    cu_q_lens: np.ndarray  # [S + 1] int32, token offsets of each sequence's queries
    num_seqs: np.ndarray  # [1] int32
    logits_indices: np.ndarray  # [S] int32, index of each sequence's last scheduled token


class SamplingTensors(NamedTuple):
    """Per-sequence sampling parameters, one row per sequence slot (padding rows are greedy)."""

    temperature: np.ndarray  # [S] float32, 0 means greedy
    top_k: np.ndarray  # [S] int32, 0 means off
    top_p: np.ndarray  # [S] float32, 1 means off
    min_p: np.ndarray  # [S] float32, 0 means off
    presence_penalty: np.ndarray  # [S] float32
    frequency_penalty: np.ndarray  # [S] float32
    repetition_penalty: np.ndarray  # [S] float32, 1 means off
    seeds: np.ndarray  # [S] uint32
    steps: np.ndarray  # [S] int32, index of the token being generated (folds into the key)
    token_history: np.ndarray  # [S, W] int32, prompt then output token ids, -1 padded
    num_prompt_tokens: np.ndarray  # [S] int32, how many history entries are prompt
    banned_token_ids: np.ndarray  # [S, MAX_BANNED] int32, -1 padded: EOS/stop ids under min_tokens


class StepInputs(NamedTuple):
    token_ids: np.ndarray  # [T] int32
    # [T] int32: -1, or the row of the previous step's sampled ids that holds this token (async
    # scheduling feeds a decode token the host has not seen yet straight from the device).
    token_src: np.ndarray
    attention: AttentionMetadata
    sampling: SamplingTensors


def empty_sampling_tensors(max_num_seqs: int, history_width: int) -> SamplingTensors:
    s = max_num_seqs
    return SamplingTensors(
        temperature=np.zeros(s, np.float32),
        top_k=np.zeros(s, np.int32),
        top_p=np.ones(s, np.float32),
        min_p=np.zeros(s, np.float32),
        presence_penalty=np.zeros(s, np.float32),
        frequency_penalty=np.zeros(s, np.float32),
        repetition_penalty=np.ones(s, np.float32),
        seeds=np.zeros(s, np.uint32),
        steps=np.zeros(s, np.int32),
        token_history=np.full((s, history_width), -1, np.int32),
        num_prompt_tokens=np.zeros(s, np.int32),
        banned_token_ids=np.full((s, MAX_BANNED), -1, np.int32),
    )


def build_step_inputs(requests, num_new_tokens, *, token_bucket: int, max_num_seqs: int,
                      pages_per_seq: int, history_width: int) -> StepInputs:
    """Pads a scheduled batch (host `Request`s and their token counts) to fixed shapes.

    `history_width` is 1 when no request uses penalties (the history is then not read).
    """
    slots = max_num_seqs
    if len(requests) > slots:
        raise ValueError(f"{len(requests)} sequences do not fit a step of {slots} sequence slots")
    token_ids = np.zeros(token_bucket, np.int32)
    token_src = np.full(token_bucket, -1, np.int32)
    positions = np.zeros(token_bucket, np.int32)
    kv_lens = np.zeros(slots, np.int32)
    page_indices = np.zeros((slots, pages_per_seq), np.int32)
    cu_q_lens = np.zeros(slots + 1, np.int32)
    logits_indices = np.zeros(slots, np.int32)
    sampling = empty_sampling_tensors(slots, history_width)

    offset = 0
    for i, (request, n) in enumerate(zip(requests, num_new_tokens)):
        start = request.num_computed_tokens
        known = request.all_token_ids[start:start + n]
        token_ids[offset:offset + len(known)] = known
        if len(known) < n:  # the last one is pending: sampled by the previous step, on the device
            token_src[offset + n - 1] = request.pending_row
        positions[offset:offset + n] = np.arange(start, start + n)
        kv_lens[i] = start + n
        page_indices[i, :len(request.page_ids)] = request.page_ids
        offset += n
        cu_q_lens[i + 1] = offset
        logits_indices[i] = offset - 1

        params = request.params
        sampling.temperature[i] = params.temperature
        sampling.top_k[i] = min(params.top_k, np.iinfo(np.int32).max)  # >= vocab means off
        sampling.top_p[i] = params.top_p
        sampling.min_p[i] = params.min_p
        sampling.presence_penalty[i] = params.presence_penalty
        sampling.frequency_penalty[i] = params.frequency_penalty
        sampling.repetition_penalty[i] = params.repetition_penalty
        sampling.seeds[i] = request.seed & 0xFFFFFFFF
        sampling.steps[i] = request.num_outputs_with_pending
        if request.num_outputs_with_pending < params.min_tokens:
            banned = request.stop_token_ids_under_min_tokens
            sampling.banned_token_ids[i, :len(banned)] = banned
        if history_width > 1:
            if request.num_pending:
                raise ValueError("penalties need every token on the host: schedule synchronously")
            history = request.all_token_ids
            sampling.token_history[i, :len(history)] = history
            sampling.num_prompt_tokens[i] = request.num_prompt_tokens
    cu_q_lens[len(requests) + 1:] = offset

    attention = AttentionMetadata(
        positions=positions,
        kv_lens=kv_lens,
        page_indices=page_indices,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([len(requests)], np.int32),
        logits_indices=logits_indices,
    )
    return StepInputs(token_ids=token_ids, token_src=token_src, attention=attention,
                      sampling=sampling)


Layout = tuple  # ((shape, dtype string), ...): how `pack` laid its arrays out, one per array


def pack(arrays) -> tuple[np.ndarray, Layout]:
    """`arrays` (4-byte int32 / uint32 / float32 ones) end to end as one int32 buffer, and the
    layout that cuts it back into them (hashable: the compiled programs are keyed by it)."""
    arrays = [np.asarray(a) for a in arrays]
    if any(a.dtype.itemsize != 4 for a in arrays):
        raise TypeError(f"pack takes 4-byte arrays, got {[a.dtype.name for a in arrays]}")
    buffer = np.concatenate([a.reshape(-1).view(np.int32) for a in arrays])
    return buffer, tuple((a.shape, a.dtype.str) for a in arrays)


def forward_arrays(inputs: StepInputs) -> tuple[np.ndarray, ...]:
    """The forward's arrays in `pack` order: token ids, token sources, attention metadata."""
    return (inputs.token_ids, inputs.token_src, *inputs.attention)
