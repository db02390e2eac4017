"""Row-wise ops around FP8 GEMMs: XLA's fusions of the jnp references vs the Pallas kernels.

For each op of `pallas_kernels.fp8_activations` at Llama-3.1-8B's widths (SwiGLU at F = 14336,
the residual add + RMSNorm and the plain quantization at D = 4096) and each row count (a bucket of
FP8 activations), times the jnp reference compiled by XLA and the kernel for each (rows per
program, warps) variant, as the fastest of several samples of back-to-back calls
(`roofline.ceiling_seconds`), and reports the bytes one pass must move over that time, next to the
copy bandwidth measured in the same run. Each variant's e4m3 output is compared with XLA's (share
of identical bytes: XLA may skip the intermediate bf16 roundings the kernels keep). Prints a
table, saves JSON.

    python3 benchmarks/fp8_activations_bench.py --out benchmarks/results/fp8_activations.json
    python3 benchmarks/fp8_activations_bench.py --smoke --out /tmp/fp8_act.json   # CPU, interpret mode
"""

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VARIANTS = {"swiglu": ["1x8", "1x16", "1x32", "2x16", "2x32"],
                    "add_rms_norm": ["1x4", "2x4", "4x4", "4x8", "8x8", "8x16"],
                    "quantize": ["1x4", "4x4", "4x8", "8x8"]}


def op_inputs(op: str, num_rows: int, hidden: int, width: int, dtype):
    """(arguments, bytes one pass moves) for `op` at `num_rows` rows."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(num_rows), 5)
    rows_scale = jax.random.uniform(k[1], (num_rows,), jnp.float32, 1e-3, 2e-2)
    if op == "swiglu":
        y = (3000 * jax.random.normal(k[0], (num_rows, 2, width), jnp.float32)).astype(dtype)
        w_scale = jax.random.uniform(k[2], (2, width), jnp.float32, 1e-4, 2e-3)
        return (y, rows_scale, w_scale), y.nbytes + num_rows * width + 4 * num_rows
    x = jax.random.normal(k[3], (num_rows, hidden), jnp.float32).astype(dtype)
    if op == "quantize":
        return (x,), x.nbytes + num_rows * hidden + 4 * num_rows
    y = (3000 * jax.random.normal(k[0], (num_rows, hidden), jnp.float32)).astype(dtype)
    w_scale = jax.random.uniform(k[2], (hidden,), jnp.float32, 1e-4, 2e-3)
    norm = jax.random.uniform(k[4], (hidden,), jnp.float32, 0.5, 1.5).astype(dtype)
    # read residual and product, write the new residual, the e4m3 rows and their scales
    return (x, y, rows_scale, w_scale, norm), 3 * x.nbytes + num_rows * hidden + 4 * num_rows


def programs_for(op: str, variants: list[str], num_rows: int, dtype, interpret: bool) -> dict:
    import jax

    from pallas_kernels import fp8_activations as ops

    reference, kernel = {
        "swiglu": (functools.partial(ops.swiglu_fp8_reference, dtype=dtype),
                   functools.partial(ops.swiglu_fp8_gpu, dtype=dtype)),
        "add_rms_norm": (functools.partial(ops.add_rms_norm_fp8_reference, eps=1e-5),
                         functools.partial(ops.add_rms_norm_fp8_gpu, eps=1e-5)),
        "quantize": (ops.quantize_rows, ops.quantize_fp8_gpu)}[op]
    programs = {"xla": jax.jit(reference)}
    for variant in variants:
        rows, warps = (int(n) for n in variant.split("x"))
        if num_rows % rows == 0:
            programs[f"kernel {variant}"] = jax.jit(functools.partial(
                kernel, rows=rows, num_warps=warps, interpret=interpret))
    return programs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(DEFAULT_VARIANTS))
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--hidden", type=int, default=4096, help="the model's hidden size")
    parser.add_argument("--width", type=int, default=14336, help="the MLP's intermediate size")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="kernel variants as ROWSxWARPS (default: a list per op)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpaged.bench.roofline import ceiling_seconds, copy_bandwidths

    interpret = jax.devices()[0].platform != "gpu"
    if args.smoke:
        args.rows, args.hidden, args.width, args.repeats = [8], 256, 1536, 2
        args.variants = ["1x4", "2x4"]
    dtype = jnp.bfloat16
    copy = max(copy_bandwidths(64 << 20 if args.smoke else 2 << 30).values())
    report = {"command": "python3 benchmarks/fp8_activations_bench.py " + " ".join(argv or sys.argv[1:]),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_bandwidth_bytes_s": copy, "hidden": args.hidden, "width": args.width, "results": []}
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; D = {args.hidden}, F = {args.width}")
    for op in args.ops:
        for num_rows in args.rows:
            inputs, moved = op_inputs(op, num_rows, args.hidden, args.width, dtype)
            programs = programs_for(op, args.variants or DEFAULT_VARIANTS[op], num_rows, dtype, interpret)

            def e4m3_out(program):
                outs = program(*inputs)
                return outs[-2]  # every op returns (..., e4m3 rows, scales)

            want = np.asarray(e4m3_out(programs["xla"])).view(np.uint8)
            for name, program in programs.items():
                same = float((np.asarray(e4m3_out(program)).view(np.uint8) == want).mean())
                seconds = ceiling_seconds(functools.partial(e4m3_out, program), args.repeats,
                                          warmup_seconds=0.0 if args.smoke else 0.5)
                report["results"].append({"op": op, "num_rows": num_rows, "variant": name, "bytes": moved,
                                          "us": 1e6 * seconds, "tb_s": moved / seconds / 1e12,
                                          "of_copy": moved / seconds / copy, "same_as_xla": same})
                print(f"{op:12s} rows {num_rows:5d} {name:14s}: {1e6 * seconds:8.1f} us, "
                      f"{moved / seconds / 1e12:5.2f} TB/s ({moved / seconds / copy:.2f} of copy), "
                      f"same e4m3 bytes as XLA {same:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
