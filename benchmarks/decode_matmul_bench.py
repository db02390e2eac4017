"""Decode matmuls: XLA's GEMMs (with its norm, split-K reduction and SiLU kernels around them)
against the fused Pallas kernels of `pallas_kernels.gpu_matmul`, on an 8B model's shapes.

For each op (q/k/v with the input norm, o + residual, gate/up with the post norm and SiLU x up,
down + residual) it times the kernel over `--layers` layers of random bf16 weights (so the
weights come from HBM, not L2) for each tile variant, then a layer's whole dense chain (the four
ops in order, attention replaced by taking the q rows) with XLA and with the best tiles. The
floor is the chain's weight bytes over the copy bandwidth measured in the same run. The fused
chain's output is compared with XLA's (bf16 tolerance).

    python3 benchmarks/decode_matmul_bench.py --rows 16 32 --out decode_matmul.json
    python3 benchmarks/decode_matmul_bench.py --smoke      # CPU: tiny shapes, interpret mode
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpaged.bench.roofline import ceiling_seconds, copy_bandwidth  # noqa: E402
from jaxpaged.models.layers import rms_norm, swiglu_mlp  # noqa: E402
from pallas_kernels import gpu_matmul  # noqa: E402

EPS = 1e-5
OPS = ("norm_matmul", "matmul_add_o", "norm_swiglu", "matmul_add_down")
# o and down again with the weights stored [N, K] (K contiguous), only in the op sweep: do the
# [K, N] kernels lose to the short rows each program reads (block_n * 2 bytes)?
TRANSPOSED_OPS = ("matmul_add_o_nk", "matmul_add_down_nk")


def make_layers(num_layers, hidden, q_width, kv_width, inter, dtype, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 8 * num_layers))
    normal = lambda *shape, scale=1.0: (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
    return [dict(g1=normal(hidden, scale=0.1) + 1, g2=normal(hidden, scale=0.1) + 1,
                 wq=normal(hidden, q_width, scale=hidden ** -0.5),
                 wk=normal(hidden, kv_width, scale=hidden ** -0.5),
                 wv=normal(hidden, kv_width, scale=hidden ** -0.5),
                 wo=normal(q_width, hidden, scale=q_width ** -0.5),
                 wgu=normal(hidden, 2, inter, scale=hidden ** -0.5),
                 wd=normal(inter, hidden, scale=inter ** -0.5)) for _ in range(num_layers)]


def layer_bytes(p) -> int:
    return sum(p[k].nbytes for k in ("wq", "wk", "wv", "wo", "wgu", "wd"))


def xla_layer(x, p):
    """The model's own jnp code for one layer's dense ops (jaxpaged.models.llama)."""
    h = rms_norm(x, p["g1"], EPS)
    qkv = jnp.concatenate([h @ p["wq"], h @ p["wk"], h @ p["wv"]], axis=1)
    x = x + qkv[:, :p["wo"].shape[0]] @ p["wo"]
    x = x + swiglu_mlp(rms_norm(x, p["g2"], EPS), p["wgu"], p["wd"])
    return x, qkv


def fused_layer(x, p, tiles, interpret):
    qkv = gpu_matmul.norm_matmul(x, p["g1"], (p["wq"], p["wk"], p["wv"]), eps=EPS,
                                 tiles=tiles["norm_matmul"], interpret=interpret)
    x = gpu_matmul.matmul_add(qkv[:, :p["wo"].shape[0]], p["wo"], x, tiles=tiles["matmul_add_o"],
                              interpret=interpret)
    act = gpu_matmul.norm_swiglu(x, p["g2"], p["wgu"], eps=EPS, tiles=tiles["norm_swiglu"],
                                 interpret=interpret)
    x = gpu_matmul.matmul_add(act, p["wd"], x, tiles=tiles["matmul_add_down"], interpret=interpret)
    return x, qkv


def chain(layer_fn):
    @jax.jit
    def run(x, layers):
        outs = []
        for p in layers:
            x, qkv = layer_fn(x, p)
            outs.append(qkv)
        return x, outs
    return run


def op_runner(op, tiles, interpret):
    """The op alone, once per layer on the same input (every output returned)."""
    def one(x, act, p):
        if op == "norm_matmul":
            return gpu_matmul.norm_matmul(x, p["g1"], (p["wq"], p["wk"], p["wv"]), eps=EPS, tiles=tiles,
                                          interpret=interpret)
        if op == "matmul_add_o":
            return gpu_matmul.matmul_add(x, p["wo"], x, tiles=tiles, interpret=interpret)
        if op == "norm_swiglu":
            return gpu_matmul.norm_swiglu(x, p["g2"], p["wgu"], eps=EPS, tiles=tiles, interpret=interpret)
        if op == "matmul_add_o_nk":
            return gpu_matmul.matmul_add(x, p["wo_nk"], x, tiles=tiles, interpret=interpret, transposed=True)
        if op == "matmul_add_down_nk":
            return gpu_matmul.matmul_add(act, p["wd_nk"], x, tiles=tiles, interpret=interpret, transposed=True)
        return gpu_matmul.matmul_add(act, p["wd"], x, tiles=tiles, interpret=interpret)
    return jax.jit(lambda x, act, layers: [one(x, act, p) for p in layers])


def op_bytes(op, p) -> int:
    return {"norm_matmul": p["wq"].nbytes + p["wk"].nbytes + p["wv"].nbytes,
            "matmul_add_o": p["wo"].nbytes, "norm_swiglu": p["wgu"].nbytes,
            "matmul_add_down": p["wd"].nbytes}[op.removesuffix("_nk")]


def tile_variants(full: bool, transposed: bool = False):
    if transposed:  # rows of K contiguous: longer K tiles
        return [(bn, bk, 4, st) for bn, bk, st in itertools.product((16, 32, 64), (256, 512, 1024), (3, 4))]
    if not full:
        return [(32, 256, 4, 4), (16, 256, 4, 4), (64, 256, 4, 4)]
    base = [(bn, bk, 4, st) for bn, bk, st in itertools.product((16, 32, 64), (128, 256, 512), (3, 5))]
    return base + [(32, 256, 2, 4), (32, 256, 8, 4), (16, 512, 2, 5), (64, 128, 8, 5)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--q-width", type=int, default=4096)
    ap.add_argument("--kv-width", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--full-sweep-rows", type=int, default=16,
                    help="the row count whose sweep tries every tile variant (others try three and that best)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS + TRANSPOSED_OPS,
                    help="ops to sweep (the chain runs when all four of OPS are swept)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    interpret = jax.devices()[0].platform != "gpu"
    dtype = jnp.bfloat16
    if args.smoke:
        args.rows, args.layers, args.repeats = [16], 2, 2
        args.hidden, args.q_width, args.kv_width, args.inter = 256, 256, 64, 512
        dtype = jnp.float32
    layers = make_layers(args.layers, args.hidden, args.q_width, args.kv_width, args.inter, dtype)
    if set(TRANSPOSED_OPS) & set(args.ops):
        for p in layers:
            p["wo_nk"], p["wd_nk"] = p["wo"].T.copy(), p["wd"].T.copy()
    bandwidth = copy_bandwidth(64 << 20 if args.smoke else 2 << 30, 2 if args.smoke else 10)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, {args.layers} layers")
    result = dict(command=" ".join(sys.argv), device=jax.devices()[0].device_kind,
                  jax=jax.__version__, copy_bandwidth=bandwidth, rows={})
    best_full = {}
    for rows in args.rows:
        keys = jax.random.split(jax.random.key(rows), 2)
        x = jax.random.normal(keys[0], (rows, args.hidden), jnp.float32).astype(dtype)
        act = (0.1 * jax.random.normal(keys[1], (rows, args.inter), jnp.float32)).astype(dtype)
        entry = dict(ops={}, chain={})
        best = {}
        for op in args.ops:
            floor_us = op_bytes(op, layers[0]) / bandwidth * 1e6
            variants = tile_variants(args.smoke is False and rows == args.full_sweep_rows, op.endswith("_nk"))
            if op in best_full and best_full[op] not in variants:
                variants.append(best_full[op])
            times = {}
            for tiles in variants:
                try:
                    run = op_runner(op, tiles, interpret)
                    seconds = ceiling_seconds(lambda: run(x, act, layers)[-1], args.repeats,
                                              warmup_seconds=0.0 if args.smoke else 0.5)
                    times[tiles] = seconds / args.layers * 1e6
                except Exception as err:  # a tile that does not fit shared memory, say
                    print(f"  {op} {tiles}: failed: {str(err).splitlines()[0][:120]}")
            best[op] = min(times, key=times.get)
            if rows == args.full_sweep_rows:
                best_full[op] = best[op]
            entry["ops"][op] = dict(floor_us=floor_us, best=list(best[op]),
                                    us={"%d,%d,%d,%d" % t: v for t, v in times.items()})
            print(f"rows {rows} {op:16s} floor {floor_us:7.2f} us  best {times[best[op]]:7.2f} us "
                  f"{best[op]}  worst {max(times.values()):7.2f}")
        result["rows"][str(rows)] = entry
        if not set(OPS) <= set(best):
            continue
        floor_us = layer_bytes(layers[0]) / bandwidth * 1e6
        xla_run = chain(xla_layer)
        fused_run = chain(lambda x, p: fused_layer(x, p, best, interpret))
        for name, run in (("xla", xla_run), ("fused", fused_run)):
            seconds = ceiling_seconds(lambda: run(x, layers)[0], args.repeats,
                                      warmup_seconds=0.0 if args.smoke else 0.5)
            entry["chain"][name] = seconds / args.layers * 1e6
        want, got = xla_run(x, layers)[0].astype(jnp.float32), fused_run(x, layers)[0].astype(jnp.float32)
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        entry["chain"].update(floor_us=floor_us, max_rel_error=rel)
        c = entry["chain"]
        print(f"rows {rows} layer chain: xla {c['xla']:.2f} us ({c['xla'] / floor_us:.3f}x), fused "
              f"{c['fused']:.2f} us ({c['fused'] / floor_us:.3f}x), floor {floor_us:.2f}; max rel err {rel:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
