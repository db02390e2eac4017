"""Device ceilings measured in the same run as the numbers compared with them.

Copy bandwidth (every byte read and written once; the fastest of a few copy kernels) and the bf16 matmul rate
(`n`³ `jnp.dot`) vary between machines and leases, so benchmarks measure them alongside their
own results rather than trusting a datasheet. JAX is imported here, unlike the rest of
`jaxpaged.bench` (whose host-side modules run against remote servers).
"""

import time

import numpy as np


def run_times(fn, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of `fn()` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which must block until its work is done), after one warm-up."""
    fn()
    return float(np.median(run_times(fn, repeats)))


def ceiling_seconds(fn, repeats: int, calls: int = 10, warmup_seconds: float = 1.0) -> float:
    """Fastest per-call device time of `fn()`, which enqueues work and returns its output
    without waiting: each of `repeats` samples times `calls` back-to-back calls and one wait at
    the end, after running for `warmup_seconds` so the GPU's clocks have risen.

    A ceiling is what the device can do, so the best sample counts (a median of 20
    two-millisecond copies right after start-up read 2.16-2.62 TB/s on H100 leases). Calls are
    queued back to back because a wait per call adds the host's dispatch and sync to every
    one: timed that way the 2 GiB copy read 2.49-2.73 TB/s in four runs on one H100 lease where
    the queued 4 GiB copy of gpu_kernel_bench.py read 2.92-2.95, and the 8B model's own batch-1
    matmuls read their weights at 2.81 TB/s, above that ceiling."""
    def sample():
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        out.block_until_ready()
        return (time.perf_counter() - start) / calls

    end = time.perf_counter() + warmup_seconds
    while time.perf_counter() < end:
        fn().block_until_ready()
    return float(min(sample() for _ in range(repeats)))


# Device-to-device copies of the same bytes by different kernels: XLA's elementwise loop on
# 2-byte and on 4-byte elements, and a plain copy (which XLA runs as a memcpy). On an H200 the
# bf16 `a + 1` moved 3.29 TB/s while the 8B model's batch-1 matmuls read their weights at 4.03
# TB/s (benchmarks/results/h200_session9.md), so no single kernel is taken for the ceiling.
COPY_KINDS = {
    "bf16_add": ("bfloat16", lambda a: a + 1),
    "f32_add": ("float32", lambda a: a + 1),
    "memcpy": ("float32", lambda a: a.copy()),
}


def copy_bandwidths(num_bytes: int = 2 << 30, repeats: int = 10) -> dict[str, float]:
    """Bytes per second read + written by each of COPY_KINDS over a `num_bytes` array (the best
    of `repeats` samples of back-to-back copies, after a warm-up)."""
    import jax
    import jax.numpy as jnp

    rates = {}
    for name, (dtype, fn) in COPY_KINDS.items():
        dtype = jnp.dtype(dtype)
        x = jax.random.normal(jax.random.key(0), (num_bytes // dtype.itemsize,), dtype)
        copy = jax.jit(fn)
        if copy(x).unsafe_buffer_pointer() == x.unsafe_buffer_pointer():  # nothing was copied
            raise RuntimeError(f"copy kind {name} returned its input buffer")
        rates[name] = 2 * num_bytes / ceiling_seconds(lambda: copy(x), repeats)
        del x
    return rates


def copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 10) -> float:
    """The device's copy bandwidth: the fastest of `copy_bandwidths`."""
    return max(copy_bandwidths(num_bytes, repeats).values())


def square_matmul(n: int, dtype="bfloat16"):
    """A function that enqueues one n x n x n matmul of two random arrays and returns its
    output without waiting (what the matmul rates time)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in (1, 2))
    matmul = jax.jit(jnp.dot)
    return lambda: matmul(a, b)


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP per second of one n x n x n matmul (the best of `repeats` samples of
    back-to-back matmuls, after a warm-up)."""
    return 2 * n ** 3 / ceiling_seconds(square_matmul(n), repeats)


def rate_windows(fn, work_per_call: float, seconds: float, window: float) -> list[dict]:
    """Calls `fn()` (which enqueues work and returns its output without waiting) back to back
    for `seconds`, waiting once per `window` seconds: each window's start and end
    (`time.perf_counter`) and its rate, `work_per_call` per call over the window's wall time."""
    fn().block_until_ready()
    windows, begin = [], time.perf_counter()
    while time.perf_counter() - begin < seconds:
        start, calls, out = time.perf_counter(), 0, None
        while time.perf_counter() - start < window:
            out = fn()
            calls += 1
        out.block_until_ready()
        end = time.perf_counter()
        windows.append({"start": start, "end": end, "rate": calls * work_per_call / (end - start)})
    return windows


def sustained_matmul_rate(n: int = 8192, seconds: float = 6.0, window: float = 0.5) -> float:
    """bf16 FLOP per second of n x n x n matmuls run back to back for `seconds`: the mean rate
    of the second half's windows.

    The burst rate (`matmul_rate`) is what the GPU does at its boost clock. Long GEMM work holds
    an H100 at its 700 W power cap instead: there 8192^3 matmuls ran at 695 TFLOP/s against 805
    in a burst, the SM clock at ~1,360 of 1,980 MHz, and the 8B offline run was at the cap in
    96-99% of nvidia-smi's samples (benchmarks/results/h100_session25.md). The cap set in within
    the first half-second window; the first half is left out all the same."""
    windows = rate_windows(square_matmul(n), 2 * n ** 3, seconds, window)
    late = windows[len(windows) // 2:]
    return float(sum(w["rate"] for w in late) / len(late))


def default_page_size() -> int:
    """The engine's default page size on this machine's devices (`EngineConfig.page_size`
    unset), so benchmarks that build a runner themselves time what the engine would run."""
    import jax

    from jaxpaged.config import EngineConfig

    return EngineConfig().resolved_page_size(jax.devices()[0].platform)


def decode_weight_bytes(params, config) -> int:
    """Bytes of weights a decode step reads: every param but the embedding table, of which
    decode gathers a few rows (unless it is tied, and so also the LM head)."""
    import jax

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    return total if config.tie_word_embeddings else total - params["embed"].nbytes


def decode_batch_inputs(batch: int, context: int, vocab_size: int, page_size: int, bucket: int,
                        max_num_seqs: int | None = None, prefill_chunks: tuple[int, ...] = ()):
    """One decode step's inputs for `batch` sequences that each hold `context` cached tokens (in
    pages laid out one sequence after another) and decode one more: what the decode-step
    benchmarks time. `prefill_chunks`: also that many new sequences, each prefilling its first
    chunk of the given length (the mixed steps of an offline run). `max_num_seqs` (default: the
    sequences in the step): the runner's sequence slots, as an engine configured for more
    sequences than are running has. Returns (StepInputs, pages_per_seq)."""
    from jaxpaged.request import Request
    from jaxpaged.sampling_params import SamplingParams
    from jaxpaged.step_inputs import build_step_inputs

    lengths = [context] * batch + list(prefill_chunks)
    pages_per_seq = -(-(max(lengths) + 1) // page_size)
    rng = np.random.default_rng(0)
    requests, next_page = [], 0
    for i, length in enumerate(lengths):
        request = Request(str(i), rng.integers(0, vocab_size, length).tolist(),
                          SamplingParams(temperature=0), seed=i)
        used = -(-(length + 1) // page_size)
        request.page_ids = list(range(next_page, next_page + used))
        next_page += used
        request.num_computed_tokens = length - 1 if i < batch else 0
        requests.append(request)
    inputs = build_step_inputs(requests, [1] * batch + list(prefill_chunks), token_bucket=bucket,
                               max_num_seqs=max_num_seqs or len(requests),
                               pages_per_seq=pages_per_seq, history_width=1)
    return inputs, pages_per_seq


def offline_floor(config, *, num_prompts: int, input_len: int, output_len: int, matmul_flop_s: float,
                  copy_bytes_s: float, kv_itemsize: int) -> dict:
    """How fast an offline run could go on a device with the given measured rates: each of
    `num_prompts` prompts of `input_len` tokens produces `output_len` tokens (EOS ignored).

    - Matmuls: every token that goes through the layers (the prompt's, and each output token
      but the last, fed back to decode the next) multiplies by every linear weight, 2 flops a
      weight; each output token also by the LM head (its logits).
    - Attention's QK^T and PV: 4 * Hq * head_dim flops per (query, key) pair, causal.
    - Both at the matmul rate; then each fed-back token reads its sequence's cached keys and
      values once, at the copy bandwidth (prefill's reads are inside its flops).

    The parts are added: the engine runs matmuls and attention as separate kernels, one after
    another. The sum is still a floor for this engine, not for every engine: it ignores
    everything else a step does (norms, activations, rope, sampling), weight reads where
    they outlast the matmuls (small decode batches), and matmuls below the measured rate."""
    hd, layers = config.head_dim, config.num_layers
    q_dim, kv_dim = config.num_q_heads * hd, config.num_kv_heads * hd
    d, f = config.hidden_size, config.intermediate_size
    linear_weights = layers * (d * (q_dim + 2 * kv_dim) + q_dim * d + 3 * d * f)
    layer_tokens = num_prompts * (input_len + output_len - 1)
    sampled = num_prompts * output_len
    matmul_flops = 2 * linear_weights * layer_tokens + 2 * d * config.vocab_size * sampled
    positions = input_len + output_len - 1  # a sequence's tokens through the layers
    pairs = num_prompts * positions * (positions + 1) // 2  # (query, key) pairs, causal
    attention_flops = 4 * q_dim * layers * pairs
    # Fed-back token j (0 <= j < output_len - 1) sits at position input_len + j: it reads the
    # input_len + j keys before it.
    keys_read = num_prompts * sum(input_len + j for j in range(output_len - 1))
    kv_read_bytes = keys_read * 2 * kv_dim * kv_itemsize * layers
    matmul_seconds = (matmul_flops + attention_flops) / matmul_flop_s
    kv_seconds = kv_read_bytes / copy_bytes_s
    seconds = matmul_seconds + kv_seconds
    return {"matmul_flops": matmul_flops, "attention_flops": attention_flops, "kv_read_bytes": kv_read_bytes,
            "matmul_seconds": matmul_seconds, "kv_read_seconds": kv_seconds, "seconds": seconds,
            "output_tok_s": sampled / seconds}
