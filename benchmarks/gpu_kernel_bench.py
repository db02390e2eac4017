"""Time the GPU Pallas ragged paged attention kernel against the pure-jnp reference.

Decode batches {1, 8, 32, 128} x context {512, 2048, 8192} and prefill 1x2048, 8x512, Llama-3-8B
attention heads (32 q / 8 kv, head_dim 128), bf16. Reports median time, achieved KV bandwidth
(KV bytes read / time) and its ratio to a device-to-device copy measured in the same run.

    python benchmarks/gpu_kernel_bench.py [--out results.json]
    python benchmarks/gpu_kernel_bench.py --smoke --interpret   # tiny, CPU
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference  # noqa: E402
from pallas_kernels.gpu import ragged_paged_attention_gpu  # noqa: E402


def median_time(fn, args, repeats, cache_arg=None):
    """Median wall time. With cache_arg, fn donates that argument and returns (out, new cache),
    which feeds the next call: the K/V write is then in place, not a copy of the whole cache."""
    args = list(args)
    times = []
    for i in range(repeats + 1):  # the first call compiles and warms up
        t0 = time.perf_counter()
        res = jax.block_until_ready(fn(*args))
        if i:
            times.append(time.perf_counter() - t0)
        if cache_arg is not None:
            args[cache_arg] = res[1]
    return statistics.median(times), tuple(args)


def copy_bandwidth(nbytes, repeats):
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t, _ = median_time(jax.jit(lambda a: a * 1.0), (x,), repeats)
    return 2 * x.nbytes / t  # read + write


def make_args(batch, q_len, ctx, *, hq, hkv, d, page_size, dtype):
    pages_per_seq = -(-ctx // page_size)
    num_pages = batch * pages_per_seq + 1
    rng = np.random.default_rng(0)
    t = batch * q_len
    kv = jnp.asarray(rng.standard_normal(get_kv_cache_shape(num_pages, page_size, hkv, d), np.float32), dtype)
    page_indices = jnp.asarray(rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq), jnp.int32)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    return (r(t, hq, d), r(t, hkv, d), r(t, hkv, d), kv, jnp.full((batch,), ctx, jnp.int32), page_indices,
            jnp.arange(batch + 1, dtype=jnp.int32) * q_len, jnp.asarray([batch], jnp.int32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--page-sizes", default="16,32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.smoke:
        hq, hkv, d, repeats = 4, 2, 64, 1
        cases = [("decode", 2, 1, 40), ("prefill", 1, 16, 16)]
        page_sizes = [16]
    else:
        hq, hkv, d, repeats = 32, 8, 128, a.repeats
        cases = [("decode", b, 1, c) for b in (1, 8, 32, 128) for c in (512, 2048, 8192)]
        cases += [("prefill", 1, 2048, 2048), ("prefill", 8, 512, 512)]
        page_sizes = [int(p) for p in a.page_sizes.split(",")]
    dtype = jnp.bfloat16
    copy_bw = copy_bandwidth(1 << (16 if a.smoke else 30), repeats)
    print(f"device: {jax.devices()[0].device_kind}  copy bandwidth: {copy_bw / 1e9:.1f} GB/s")
    rows = []
    print(f"{'kind':8} {'batch':>5} {'q_len':>5} {'ctx':>6} {'page':>4} {'impl':8} {'ms':>9} {'GB/s':>8} {'of copy':>7}")
    for kind, batch, q_len, ctx in cases:
        for page_size in page_sizes:
            args = make_args(batch, q_len, ctx, hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=dtype)
            kv_bytes = batch * ctx * 2 * hkv * d * jnp.dtype(dtype).itemsize
            static = dict(sm_scale=d**-0.5)
            qb = 1 if kind == "decode" else 16
            impls = {
                "ref": jax.jit(lambda *x: ragged_paged_attention_reference(*x, **static), donate_argnums=3),
                "pallas": jax.jit(lambda *x, qb=qb: ragged_paged_attention_gpu(
                    *x, q_block_size=qb, interpret=a.interpret, **static), donate_argnums=3),
            }
            for name, fn in impls.items():
                t, args = median_time(fn, args, repeats, cache_arg=3)  # args hold the live cache
                bw = kv_bytes / t
                rows.append(dict(kind=kind, batch=batch, q_len=q_len, ctx=ctx, page_size=page_size, impl=name,
                                 ms=t * 1e3, gbps=bw / 1e9, of_copy=bw / copy_bw))
                print(f"{kind:8} {batch:5} {q_len:5} {ctx:6} {page_size:4} {name:8} {t * 1e3:9.3f} "
                      f"{bw / 1e9:8.1f} {bw / copy_bw:7.2f}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, copy_gbps=copy_bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
