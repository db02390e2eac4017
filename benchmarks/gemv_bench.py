"""Decode-sized linear layers: the `gpu_gemv` kernels against their weight-bytes floor and XLA.

At Llama-3.1-8B's shapes (bf16) it times, for each row count (a decode bucket):
- each op alone (q/k/v with the norm, gate/up with the norm and SiLU x up, o and down with the
  residual add) for each (block_n, block_k, num_warps, num_stages) config, over `--layers`
  weight sets so no weight stays in L2: microseconds a call and the rate it reads its weights at;
  with `--sweep`, a search (block_n x block_k first, then warps x stages for the best two);
- a chain of `--layers` decoder layers without attention (norm, q/k/v, o + residual, norm,
  gate/up + SiLU x up, down + residual), as XLA compiles the model's jnp composition and with
  the kernels (default configs, and the sweep's best): microseconds a layer against the floor,
  its weight bytes over the copy bandwidth measured in the same run.
Each time is the fastest of several samples of back-to-back calls (`roofline.ceiling_seconds`).
Prints a table, saves JSON.

    python3 benchmarks/gemv_bench.py --sweep --out benchmarks/results/gemv.json
    python3 benchmarks/gemv_bench.py --smoke --out /tmp/gemv.json   # CPU, interpret mode, tiny
"""

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = dict(hidden=4096, q=4096, kv=1024, mlp=14336)
SMOKE_SHAPES = dict(hidden=64, q=64, kv=32, mlp=128)
OPS = ("rms_norm_matmul", "rms_norm_swiglu", "matmul_add_o", "matmul_add_down")


def make_layers(n: int, s: dict, dtype):
    import jax
    import jax.numpy as jnp

    def arr(key, shape, scale):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    layers = []
    for i in range(n):
        k = jax.random.split(jax.random.key(i), 8)
        d, f = s["hidden"], s["mlp"]
        layers.append(dict(
            n1=1 + arr(k[0], (d,), 0.1), n2=1 + arr(k[1], (d,), 0.1),
            wq=arr(k[2], (d, s["q"]), d ** -0.5), wk=arr(k[3], (d, s["kv"]), d ** -0.5),
            wv=arr(k[4], (d, s["kv"]), d ** -0.5), wo=arr(k[5], (s["q"], d), s["q"] ** -0.5),
            gu=arr(k[6], (d, 2, f), d ** -0.5), wd=arr(k[7], (f, d), f ** -0.5)))
    return layers


def op_call(op: str, ops, layers, xs, config):
    """A jitted function running `op` once per layer (independent calls), and its weight bytes."""
    import jax

    def run(layers, xs):
        outs = []
        for lw, x in zip(layers, xs):
            if op == "rms_norm_matmul":
                outs.append(ops["rms_norm_matmul"](x["h"], lw["n1"], (lw["wq"], lw["wk"], lw["wv"]), **config))
            elif op == "rms_norm_swiglu":
                outs.append(ops["rms_norm_swiglu"](x["h"], lw["n2"], lw["gu"], **config))
            elif op == "matmul_add_o":
                outs.append(ops["matmul_add"](x["a"], lw["wo"], x["h"], **config))
            else:
                outs.append(ops["matmul_add"](x["f"], lw["wd"], x["h"], **config))
        return outs

    names = {"rms_norm_matmul": ("wq", "wk", "wv"), "rms_norm_swiglu": ("gu",),
             "matmul_add_o": ("wo",), "matmul_add_down": ("wd",)}[op]
    nbytes = sum(layers[0][n].nbytes for n in names)
    return jax.jit(run), nbytes


def layer_chain(ops, config_by_op):
    """The decoder layers without attention, chained through the residual stream."""
    import jax

    def run(layers, x):
        qkvs = []
        for lw in layers:
            qkv = ops["rms_norm_matmul"](x, lw["n1"], (lw["wq"], lw["wk"], lw["wv"]),
                                         **config_by_op["rms_norm_matmul"])
            qkvs.append(qkv)  # an output: XLA would otherwise drop the k and v columns
            x = ops["matmul_add"](qkv[:, :lw["wq"].shape[1]], lw["wo"], x, **config_by_op["matmul_add_o"])
            act = ops["rms_norm_swiglu"](x, lw["n2"], lw["gu"], **config_by_op["rms_norm_swiglu"])
            x = ops["matmul_add"](act, lw["wd"], x, **config_by_op["matmul_add_down"])
        return x, qkvs

    return jax.jit(run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--layers", type=int, default=8, help="weight sets (more than L2 holds)")
    parser.add_argument("--sweep", action="store_true", help="search each op's config at the first row count")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import ceiling_seconds, copy_bandwidth
    from pallas_kernels import gpu_gemv

    interpret = args.smoke
    s = SMOKE_SHAPES if args.smoke else SHAPES
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    if args.smoke:
        args.rows, args.layers, args.repeats = [8], 2, 1
    kernels = {name: functools.partial(getattr(gpu_gemv, name + "_gpu"), interpret=interpret)
               for name in ("rms_norm_matmul", "rms_norm_swiglu", "matmul_add")}
    eps = {"eps": 1e-5}
    kernel_ops = {"rms_norm_matmul": lambda *a, **c: kernels["rms_norm_matmul"](*a, **eps, **c),
                  "rms_norm_swiglu": lambda *a, **c: kernels["rms_norm_swiglu"](*a, **eps, **c),
                  "matmul_add": kernels["matmul_add"]}
    xla_ops = {"rms_norm_matmul": lambda *a: gpu_gemv.rms_norm_matmul_reference(*a, **eps),
               "rms_norm_swiglu": lambda *a: gpu_gemv.rms_norm_swiglu_reference(*a, **eps),
               "matmul_add": gpu_gemv.matmul_add_reference}
    bandwidth = copy_bandwidth(256 << 20 if args.smoke else 2 << 30, repeats=args.repeats)
    layers = make_layers(args.layers, s, dtype)
    layer_bytes = sum(a.nbytes for n, a in layers[0].items() if n.startswith(("w", "gu")))
    report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shapes=s, layers=args.layers,
                  copy_bandwidth_tb_s=bandwidth / 1e12, defaults=gpu_gemv.CONFIGS, ops=[], chains=[],
                  command="python3 benchmarks/gemv_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{report['device']}: copy {bandwidth / 1e12:.2f} TB/s", flush=True)

    def inputs(rows):
        k = jax.random.split(jax.random.key(rows), 3)
        return [dict(h=jax.random.normal(k[0], (rows, s["hidden"]), dtype),
                     a=jax.random.normal(k[1], (rows, s["q"]), dtype),
                     f=jax.random.normal(k[2], (rows, s["mlp"]), dtype)) for _ in layers]

    def time_op(op, rows, config):
        xs = inputs(rows)
        fn, nbytes = op_call(op, kernel_ops, layers, xs, {"config": config})
        try:
            seconds = ceiling_seconds(lambda: fn(layers, xs)[-1], args.repeats, calls=5,
                                      warmup_seconds=0.0 if args.smoke else 0.3) / len(layers)
        except Exception as e:  # a config Triton cannot compile (shared memory, registers)
            return dict(op=op, rows=rows, config=list(config), error=str(e).splitlines()[0][:200])
        row = dict(op=op, rows=rows, config=list(config), us=seconds * 1e6,
                   weight_tb_s=nbytes / seconds / 1e12, of_copy=nbytes / seconds / bandwidth)
        print(f"  {op:16s} rows {rows:3d} {str(tuple(config)):22s} {row['us']:8.1f} us  "
              f"{row['weight_tb_s']:.2f} TB/s ({row['of_copy']:.2f} of copy)", flush=True)
        report["ops"].append(row)
        return row

    def default_config(op):
        return gpu_gemv.CONFIGS["matmul_add" if op.startswith("matmul_add") else op]

    best = {op: default_config(op) for op in OPS}
    if args.sweep:
        rows = args.rows[0]
        for op in OPS:
            print(f"sweep {op} at {rows} rows", flush=True)
            stage1 = [time_op(op, rows, (bn, bk, 4, 4)) for bn, bk in
                      itertools.product((16, 32, 64, 128), (64, 128, 256, 512))]
            ranked = sorted((r for r in stage1 if "us" in r), key=lambda r: r["us"])
            stage2 = [time_op(op, rows, (r["config"][0], r["config"][1], w, st)) for r in ranked[:2]
                      for w, st in itertools.product((4, 8), (3, 4, 6)) if (w, st) != (4, 4)]
            ranked = sorted((r for r in stage1 + stage2 if "us" in r), key=lambda r: r["us"])
            best[op] = tuple(ranked[0]["config"])
        report["best"] = {op: list(c) for op, c in best.items()}
    for rows in args.rows:
        for op in OPS:
            time_op(op, rows, default_config(op))
            if best[op] != default_config(op):
                time_op(op, rows, best[op])

    variants = {"xla": (xla_ops, {op: {} for op in OPS}),
                "kernels_default": (kernel_ops, {op: {"config": default_config(op)} for op in OPS})}
    if args.sweep:
        variants["kernels_best"] = (kernel_ops, {op: {"config": best[op]} for op in OPS})
    floor_us = layer_bytes / bandwidth * 1e6
    for rows in args.rows:
        x = jax.random.normal(jax.random.key(7), (rows, s["hidden"]), dtype)
        for name, (ops, configs) in variants.items():
            fn = layer_chain(ops, configs)
            seconds = ceiling_seconds(lambda: fn(layers, x)[0], args.repeats, calls=5,
                                      warmup_seconds=0.0 if args.smoke else 0.3) / len(layers)
            row = dict(variant=name, rows=rows, us_per_layer=seconds * 1e6, floor_us=floor_us,
                       ratio=seconds * 1e6 / floor_us)
            report["chains"].append(row)
            print(f"chain {name:16s} rows {rows:3d}: {row['us_per_layer']:7.1f} us a layer, floor "
                  f"{floor_us:.1f} ({row['ratio']:.3f}x)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
