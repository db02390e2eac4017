"""Time the GPU Pallas ragged paged attention op against the ceilings measured in the same run.

One run measures: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate;
then decode batch {1, 8, 32, 128} x context {512, 2k, 8k, 32k} and prefill 1x2048, 8x512, 8x1024 with
Llama-3-8B attention heads (32 q / 8 kv, head_dim 128), bf16. Decode reports achieved bandwidth
(KV bytes read + q/out + new k/v, over the whole op: KV write, both kernels, split merge) and its
ratio to the copy bandwidth; prefill reports TFLOP/s (causal: only attended keys count) and its
ratio to the matmul rate. The pure-jnp reference is timed where it runs in reasonable time.
`--sweep` adds page-size and decode tile/pipelining variants for a few shapes.

Decode shapes are timed with the mixed op (`pallas`: a KV-write launch, then one launch for
prefill blocks and decode programs) and
its decode-only specialisation (`decode_only`: one launch, the KV write fused; what the engine
runs for steps where every sequence decodes). `--decode-impl pallas triton` adds the op with the
Triton decode kernel (`decode_impl=`) on the same shapes in one run; `--kernel-only` adds the Triton decode kernel alone (no KV write, no prefill
path, no metadata ops) for batch 1 and 32, which separates the kernel from the op's fixed costs;
`--sweep-triton` adds Triton tile/pipelining/split variants; `--sweep-decode-only`
split/tile/pipelining variants of the decode-only op; `--sweep-engine-decode` its tile,
pipelining, warp and split variants at --page-size, ctx 1024, for --engine-batches (`--no-cases`:
the sweeps alone); `--sweep-prefill` prefill block, warp and pipelining variants (`--sweep-mixed`:
the same on the offline run's two mixed steps); `--prefill-impl
pallas cudnn` times the prefill (and mixed) shapes also with first chunks through cuDNN; `--mixed` adds
mixed steps (decodes and first chunks in one bucket, the offline run's steady state: ms per op,
the decodes' bytes and the chunks' flops); `--md` writes a side-by-side table.

    python benchmarks/gpu_kernel_bench.py --sweep --out results.json
    python benchmarks/gpu_kernel_bench.py --decode-only --no-ref --decode-impl pallas triton --out r.json --md r.md
    python benchmarks/gpu_kernel_bench.py --prefill-only --no-ref --prefill-impl pallas cudnn --out p.json
    python benchmarks/gpu_kernel_bench.py --mixed --no-ref --decode-impl pallas --out m.json
    python benchmarks/gpu_kernel_bench.py --smoke --interpret [--decode-impl pallas triton]   # tiny, CPU
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference  # noqa: E402
from pallas_kernels.gpu import ragged_paged_attention_gpu  # noqa: E402
from jaxpaged.bench.roofline import copy_bandwidths  # noqa: E402


def seconds_per_call(fn, args, *, calls, rounds, carry=None):
    """Median over `rounds` of (time of `calls` back-to-back calls) / calls; the first call
    compiles. With carry=i, fn donates args[i] and returns (out, new args[i]), which feeds the
    next call, so the cache update stays in place and nothing waits on the host between calls."""
    args = list(args)

    def run(n):
        res = None
        for _ in range(n):
            res = fn(*args)
            if carry is not None:
                args[carry] = res[1]
        jax.block_until_ready(res)

    run(2)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(calls)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), tuple(args)


def looped(op, iters):
    """`iters` applications of op in one program (lax.fori_loop), the cache carried through: the
    time per iteration is device time, free of the ~0.3 ms host dispatch of a jitted call, which
    the engine pays once per step for all its layers, not once per attention op."""

    def many(qkv, kv_pages, *meta):
        def body(_, carry):
            kv, total = carry
            out, kv = op(qkv, kv, *meta)
            return kv, total + jnp.sum(out.astype(jnp.float32))  # keeps every output row live

        kv_pages, total = lax.fori_loop(0, iters, body, (kv_pages, jnp.float32(0)))
        return total, kv_pages

    return many


def matmul_rate(n, rounds):
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    t, _ = seconds_per_call(jax.jit(jnp.dot), (a, b), calls=10, rounds=rounds)
    return 2 * n**3 / t


def make_step_args(q_lens, kv_lens, bucket, *, hq, hkv, d, page_size, dtype, kv_dtype, seed=0):
    """The op's arguments for sequences of q_lens queries at kv_lens keys, padded to `bucket`
    tokens, with random q/k/v and cache and shuffled pages."""
    pages_per_seq = -(-max(kv_lens) // page_size)
    num_seqs = len(q_lens)
    num_pages = num_seqs * pages_per_seq + 1
    rng = np.random.default_rng(seed)
    kv = jax.random.normal(jax.random.key(seed), get_kv_cache_shape(num_pages, page_size, hkv, d), dtype)
    pages = rng.permutation(num_pages)[: num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    return (r(bucket, hq, d), r(bucket, hkv, d), r(bucket, hkv, d), kv.astype(kv_dtype), jnp.asarray(kv_lens, jnp.int32),
            jnp.asarray(pages, jnp.int32), jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
            jnp.asarray([num_seqs], jnp.int32))


def make_args(batch, q_len, ctx, **geometry):
    return make_step_args([q_len] * batch, [ctx] * batch, batch * q_len, **geometry)


def make_mixed_args(num_decode, ctx, num_chunks, chunk, bucket, **geometry):
    """A mixed step as the engine's offline steady state makes them: `num_decode` sequences
    decoding at `ctx` cached keys, then `num_chunks` first chunks of `chunk` tokens, the batch
    padded to `bucket` tokens."""
    return make_step_args([1] * num_decode + [chunk] * num_chunks, [ctx] * num_decode + [chunk] * num_chunks,
                          bucket, **geometry)


def triton_kernel_only(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, interpret, sm_scale, decode=None):
    """The Triton decode kernel alone on the cache as it is (the KV write is not part of it)."""
    from pallas_kernels.triton_decode import decode_attention_triton

    out = decode_attention_triton(jnp.zeros_like(q), q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                  sm_scale=sm_scale, interpret=interpret, **(decode or {}))
    return out, kv_pages


def measure(kind, batch, q_len, ctx, page_size, impl, opts, *, hq, hkv, d, dtype, kv_dtype, rounds, interpret,
            ceilings, loop):
    """kind "decode" / "prefill": `batch` sequences of q_len queries at ctx keys; "mixed": `batch`
    decodes at ctx keys plus first chunks, q_len = (chunks, chunk tokens, bucket)."""
    geometry = dict(hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=dtype, kv_dtype=kv_dtype)
    if kind == "mixed":
        num_chunks, chunk, bucket = q_len
        args = make_mixed_args(batch, ctx, num_chunks, chunk, bucket, **geometry)
    else:
        args = make_args(batch, q_len, ctx, **geometry)
    static = dict(sm_scale=d**-0.5)
    if impl == "ref":
        op = lambda *x: ragged_paged_attention_reference(*x, **static)
    elif impl == "decode_only":
        op = lambda *x: ragged_paged_attention_gpu(*x, interpret=interpret, decode_only=True, **static, **opts)
    elif impl == "triton_kernel":
        op = lambda *x: triton_kernel_only(*x, interpret=interpret, **static, **opts)
    elif impl == "cudnn":  # prefill rows: first chunks through cuDNN (prefill_impl="cudnn")
        op = lambda *x: ragged_paged_attention_gpu(*x, interpret=interpret, prefill_impl="cudnn", **static, **opts)
    else:  # "pallas" / "triton": the whole op with that decode kernel
        op = lambda *x: ragged_paged_attention_gpu(*x, interpret=interpret, decode_impl=impl, **static, **opts)
    # q, k and v as slices of one array, as the engine's fused q/k/v projection makes them (there
    # by KV head, here [q | k | v]; the decode-only op then reads that array in place).
    q, k, v, *rest = args
    args = (jnp.concatenate([q, k, v], axis=1), *rest)
    per_op = lambda qkv, *x: op(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], *x)
    fn = jax.jit(looped(per_op, loop) if loop > 1 else per_op, donate_argnums=1)
    t, args = seconds_per_call(fn, args, calls=10 if kind == "decode" else 5, rounds=rounds, carry=1)
    t /= max(loop, 1)
    del args
    item = jnp.dtype(dtype).itemsize
    if kind == "mixed":  # bytes: the decodes' (KV read + rows); flops: the chunks'
        tokens, kv_keys = batch + num_chunks * chunk, batch * ctx
        attended = num_chunks * chunk * (chunk + 1) // 2
    else:
        tokens, kv_keys = batch * q_len, batch * ctx
        # Causal: query at position p attends p + 1 keys; QK^T and PV are 2 flops per multiply-add each.
        attended = batch * sum(ctx - q_len + j + 1 for j in range(q_len))
    nbytes = kv_keys * 2 * hkv * d * jnp.dtype(kv_dtype).itemsize + tokens * (2 * hq + 2 * hkv) * d * item
    flops = 4 * hq * d * attended
    row = dict(kind=kind, batch=batch, q_len=q_len, ctx=ctx, page_size=page_size, impl=impl, loop=loop,
               kv_dtype=jnp.dtype(kv_dtype).name,
               opts={k: v for k, v in opts.items()}, ms=t * 1e3, gbps=nbytes / t / 1e9,
               of_copy=nbytes / t / ceilings["copy"], tflops=flops / t / 1e12, of_matmul=flops / t / ceilings["matmul"])
    print(f"{kind:8} {batch:5} {str(q_len):5} {ctx:6} {page_size:4} {impl:13} {json.dumps(row['opts']):58} "
          f"{row['ms']:9.3f} {row['gbps']:8.1f} {row['of_copy']:6.2f} {row['tflops']:7.1f} {row['of_matmul']:5.2f}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also page-size and decode-variant sweeps")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--sweep-prefill", action="store_true",
                    help="also prefill block/warps/stages variants at --page-size")
    ap.add_argument("--sweep-mixed", action="store_true",
                    help="also the offline run's mixed steps with prefill block/warps/stages variants")
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument("--loop", type=int, default=20, help="op applications per timed program (1: one jitted call each)")
    ap.add_argument("--prefill-impl", nargs="+", default=["pallas"], choices=["pallas", "cudnn"],
                    help="prefill rows: the op with the Pallas prefill kernel, and/or with first "
                         "chunks through cuDNN (prefill_impl='cudnn'; GPU only)")
    ap.add_argument("--decode-impl", nargs="+", default=["pallas", "decode_only"],
                    choices=["pallas", "decode_only", "triton"],
                    help="decode kernels of the op to time, each on every shape")
    ap.add_argument("--kernel-only", action="store_true", help="also the Triton decode kernel alone (batch 1, 32)")
    ap.add_argument("--sweep-triton", action="store_true", help="also Triton decode tile/pipelining/split variants")
    ap.add_argument("--sweep-decode-only", action="store_true",
                    help="also decode-only split and tile variants on six shapes")
    ap.add_argument("--sweep-engine-decode", action="store_true",
                    help="also decode-only tile/pipelining/warp/split variants at --page-size, "
                         "ctx 1024 (--engine-batches), and the defaults at the other pages of 16, 32, 64")
    ap.add_argument("--engine-batches", type=int, nargs="+", default=[1, 32, 256],
                    help="the batches of --sweep-engine-decode")
    ap.add_argument("--no-cases", action="store_true",
                    help="only the sweeps asked for, not the decode/prefill shape grid")
    ap.add_argument("--sweep-splits", action="store_true",
                    help="also decode-only split counts 1-4 and the default at batch 16-128, ctx 1k-8k")
    ap.add_argument("--mixed", action="store_true",
                    help="also mixed steps (decodes + first chunks in one bucket, as the offline run's): "
                         "256 decodes at ctx 1088 + 2 x 1024 in 4096 tokens, 256 + 7 x 1024 in 8192, "
                         "64 at ctx 2048 + 1 x 512 in 1024")
    ap.add_argument("--kv-dtype", default="bfloat16",
                    help="the cache's dtype (float8_e4m3fn: the engine's --kv-cache-dtype fp8)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--md", type=Path, help="also write a markdown table of the decode rows, impls side by side")
    a = ap.parse_args()
    if a.interpret and ("triton" in a.decode_impl or a.kernel_only):
        # Triton's interpreter is chosen when triton is imported (lazily, by the first Triton op).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = jnp.bfloat16
    if a.smoke:
        hq, hkv, d, rounds, page = 4, 2, 64, 1, 16
        cases = [("decode", 2, 1, 40)] + ([("mixed", 2, (2, 9, 24), 40)] if a.mixed else [])
        copies = copy_bandwidths(1 << 16, 1)
        ceilings = dict(copy=max(copies.values()), matmul=matmul_rate(64, 1))
    else:
        hq, hkv, d, rounds, page = 32, 8, 128, a.rounds, a.page_size
        cases = [] if a.prefill_only else [("decode", b, 1, c) for b in (1, 8, 32, 128)
                                           for c in (512, 2048, 8192, 32768)]
        cases += [] if a.decode_only else [("prefill", 1, 2048, 2048), ("prefill", 8, 512, 512),
                                           ("prefill", 8, 1024, 1024)]
        if a.mixed:
            cases += [("mixed", 256, (2, 1024, 4096), 1088), ("mixed", 256, (7, 1024, 8192), 1088),
                      ("mixed", 64, (1, 512, 1024), 2048)]
        copies = copy_bandwidths(4 << 30, rounds)
        ceilings = dict(copy=max(copies.values()), matmul=matmul_rate(8192, rounds))
    device = jax.devices()[0].device_kind
    print(f"device: {device}  copy bandwidth: {ceilings['copy'] / 1e9:.1f} GB/s (fastest of "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in copies.items())
          + f")  bf16 matmul: {ceilings['matmul'] / 1e12:.1f} TFLOP/s")
    print(f"{'kind':8} {'batch':>5} {'q_len':>5} {'ctx':>6} {'page':>4} {'impl':13} {'opts':58} {'ms':>9} {'GB/s':>8} "
          f"{'/copy':>6} {'TFLOP/s':>7} {'/mm':>5}")
    rows = []

    def save():  # after every row: a run cut short still leaves its numbers
        if a.out:
            a.out.write_text(json.dumps(dict(device=device, command=" ".join(sys.argv), copy_gbps=ceilings["copy"] / 1e9,
                                             copy_kinds_gbps={k: v / 1e9 for k, v in copies.items()},
                                             matmul_tflops=ceilings["matmul"] / 1e12, rows=rows), indent=1))

    def measure_row(*args, **kw):
        try:
            rows.append(measure(*args, hq=hq, hkv=hkv, d=d, dtype=dtype, kv_dtype=jnp.dtype(a.kv_dtype),
                                rounds=rounds, interpret=a.interpret,
                                ceilings=ceilings, loop=1 if a.smoke else a.loop, **kw))
        except Exception as e:  # a variant that fails to compile must not cost the rest of the run
            if a.smoke:
                raise
            print(f"FAILED {args}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(zip(("kind", "batch", "q_len", "ctx", "page_size", "impl", "opts"), args), error=str(e)[:300]))
        save()
        if a.md:
            a.md.write_text(markdown_table(rows, device, ceilings))

    for kind, batch, q_len, ctx in [] if a.no_cases else cases:
        opts = dict(q_block_size=4) if a.smoke and kind != "decode" else {}
        impls = {"decode": a.decode_impl, "prefill": a.prefill_impl,
                 "mixed": ["pallas"] + [i for i in a.prefill_impl if i == "cudnn"]}[kind]
        for impl in [i for i in impls if i != "decode_only" or kind == "decode"]:
            measure_row(kind, batch, q_len, ctx, page, impl, opts)
        if a.kernel_only and kind == "decode" and batch in (1, 2, 32):
            measure_row(kind, batch, q_len, ctx, page, "triton_kernel", {})
        if not a.no_ref and (kind != "decode" or batch * ctx <= 32 * 8192):  # the reference is slow
            measure_row(kind, batch, q_len, ctx, page, "ref", {})
    if a.sweep_triton and not a.smoke:
        for batch, ctx in ((32, 2048), (32, 8192)):  # two of the shapes below target with Pallas
            # Default for these shapes: 3 splits (about 4 programs per SM), 64-key tiles, 3 stages.
            for dec in (dict(block_n=128), dict(num_stages=2), dict(num_stages=4), dict(num_warps=8),
                        dict(merge="kernel"), dict(num_splits=1), dict(num_splits=2), dict(num_splits=6)):
                measure_row("decode", batch, 1, ctx, page, "triton", dict(decode=dec))
    if a.sweep_decode_only and not a.smoke:
        for batch, ctx in ((1, 1024), (1, 32768), (8, 8192), (8, 32768), (32, 2048), (32, 8192), (128, 2048)):
            for dec in [dict(num_splits=n) for n in (1, 2, 4, 8, 16) if batch * n <= 64] + [dict(pages_per_iter=2)]:
                measure_row("decode", batch, 1, ctx, page, "decode_only", dict(decode=dec))
    if a.sweep_engine_decode and not a.smoke:
        # An 8B engine's decode-only steps at --page-size: keys per iteration (up to 128) x
        # pipeline depth at 4 warps, then 8 warps; the other page sizes at their defaults.
        pages = [p for p in (1, 2, 4, 8) if p * page <= 128]
        variants = [dict(pages_per_iter=p, num_stages=st) for p in pages for st in (2, 3, 4)]
        variants += [dict(pages_per_iter=p, num_warps=8, num_stages=st) for p in pages for st in (2, 3)]
        variants += [dict(num_warps=2), dict(num_splits=2)]
        for batch in a.engine_batches:
            measure_row("decode", batch, 1, 1024, page, "decode_only", {})
            for dec in variants:
                measure_row("decode", batch, 1, 1024, page, "decode_only", dict(decode=dec))
            for page_size in sorted({16, 32, 64} - {page}):
                measure_row("decode", batch, 1, 1024, page_size, "decode_only", {})
    if a.sweep_splits and not a.smoke:
        for batch, ctx in ((16, 2048), (16, 8192), (32, 1024), (32, 2048), (32, 8192), (64, 1024), (64, 2048),
                           (64, 8192), (128, 1024), (128, 2048)):
            measure_row("decode", batch, 1, ctx, page, "decode_only", {})
            for n in (1, 2, 3, 4):
                if batch * hkv * n <= 2048:
                    measure_row("decode", batch, 1, ctx, page, "decode_only", dict(decode=dict(num_splits=n)))
    if a.sweep and not a.smoke:
        for batch, ctx in ((32, 8192), (128, 2048)):
            for page_size in (16, 128):
                measure_row("decode", batch, 1, ctx, page_size, "pallas", {})
            for warps, stages, keys in ((4, 2, 128), (8, 3, 128), (4, 3, 256)):
                dec = dict(num_warps=warps, num_stages=stages, pages_per_iter=max(1, keys // page))
                measure_row("decode", batch, 1, ctx, page, "pallas", dict(decode=dec))
        for bq, ppb, warps, stages in ((16, 1, 4, 2), (32, 1, 8, 2)):
            opts = dict(q_block_size=bq, kv_block_size=ppb * page, num_warps=warps, num_stages=stages)
            measure_row("prefill", 1, 2048, 2048, page, "pallas", opts)
    if a.sweep_mixed and not a.smoke:
        # The offline run's mixed steps with the launch's prefill tile and warps varied (the warps
        # and stages are the whole launch's, so the decode programs run with them too).
        for bq, keys, warps, stages in ((16, 64, 4, None), (32, 64, 8, 3), (32, 64, 4, 3), (16, 64, 8, 3),
                                        (16, 64, 4, 2), (16, 128, 4, 2)):
            opts = dict(q_block_size=bq, kv_block_size=keys, num_warps=warps, num_stages=stages)
            for batch, shape in ((256, (2, 1024, 4096)), (256, (7, 1024, 8192))):
                measure_row("mixed", batch, shape, 1088, page, "pallas", opts)
    if a.sweep_prefill and not a.smoke:
        # (q block, keys per KV block, warps, stages); the first is the default (stages by tile
        # bytes: 3 here). M rows of a tile = q block x 4 (Llama-3's 4 q heads per KV head).
        variants = ((16, 64, 4, None), (16, 64, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3),
                    (16, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 32, 4, 3))
        for batch, q_len in ((1, 2048), (8, 1024), (8, 512)):  # 8 x 1024: an offline step's chunks
            for bq, keys, warps, stages in variants:
                opts = dict(q_block_size=bq, kv_block_size=keys, num_warps=warps, num_stages=stages)
                measure_row("prefill", batch, q_len, q_len, page, "pallas", opts)


def markdown_table(rows, device, ceilings):
    """Decode rows with default options, one line per shape, impls side by side."""
    impls = [i for i in ("pallas", "decode_only", "triton", "triton_kernel") if any(r.get("impl") == i for r in rows)]
    others = [i for i in impls[1:] if i != "triton_kernel"]
    cell = {(r["batch"], r["ctx"], r["impl"]): r for r in rows
            if r.get("kind") == "decode" and not r.get("opts") and "error" not in r}
    shapes = sorted({(b, c) for b, c, _ in cell})
    head = " | ".join(f"{i} ms | {i} of copy" for i in impls)
    lines = [f"Device: {device}; copy {ceilings['copy'] / 1e9:.0f} GB/s. Decode, whole op unless `triton_kernel`.", "",
             f"| batch | ctx | {head} | " + " | ".join(f"{impls[0]} / {i}" for i in others) + " |",
             "| ---: | ---: |" + " ---: | ---: |" * len(impls) + " ---: |" * len(others)]
    for b, c in shapes:
        vals = []
        for i in impls:
            r = cell.get((b, c, i))
            vals += [f"{r['ms']:.3f}", f"{r['of_copy']:.2f}"] if r else ["", ""]
        first = cell.get((b, c, impls[0]))
        ratios = [f"{first['ms'] / r['ms']:.2f}" if first and r else ""
                  for r in (cell.get((b, c, i)) for i in others)]
        lines.append(f"| {b} | {c} | " + " | ".join(vals + ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
