"""The op between an FP8 MLP's GEMMs: XLA's fusions of the jnp reference vs the Pallas kernel.

For each row count (a bucket of FP8 activations) at the MLP width of Llama-3.1-8B, times
`swiglu_fp8_reference` compiled by XLA and `swiglu_fp8_gpu` for each (rows per program, warps)
variant, as the fastest of several samples of back-to-back calls (`roofline.ceiling_seconds`), and
reports the bytes one pass must move (the bf16 [T, 2, F] product read, the e4m3 [T, F] rows
written) over that time, next to the copy bandwidth measured in the same run. Each variant's
output is compared with XLA's (share of identical e4m3 bytes). Prints a table, saves JSON.

    python3 benchmarks/swiglu_fp8_bench.py --out benchmarks/results/swiglu_fp8.json
    python3 benchmarks/swiglu_fp8_bench.py --smoke --out /tmp/swiglu.json    # CPU, interpret mode
"""

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--width", type=int, default=14336, help="the MLP's intermediate size")
    parser.add_argument("--variants", nargs="+", default=["1x4", "1x8", "1x16", "2x8", "2x16", "4x16"],
                        help="kernel variants as ROWSxWARPS")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpaged.bench.roofline import ceiling_seconds, copy_bandwidths
    from pallas_kernels.swiglu_fp8 import swiglu_fp8_gpu, swiglu_fp8_reference

    interpret = jax.devices()[0].platform != "gpu"
    if args.smoke:
        args.rows, args.width, args.variants, args.repeats = [8], 1536, ["1x4", "2x4"], 2
    dtype = jnp.bfloat16
    copy = max(copy_bandwidths(64 << 20 if args.smoke else 2 << 30).values())
    report = {"command": "python3 benchmarks/swiglu_fp8_bench.py " + " ".join(argv or sys.argv[1:]),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_bandwidth_bytes_s": copy, "width": args.width, "rows": []}
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; F = {args.width}")
    for num_rows in args.rows:
        keys = jax.random.split(jax.random.key(num_rows), 3)
        y = (3000 * jax.random.normal(keys[0], (num_rows, 2, args.width), jnp.float32)).astype(dtype)
        x_scale = jax.random.uniform(keys[1], (num_rows,), jnp.float32, 1e-3, 2e-2)
        w_scale = jax.random.uniform(keys[2], (2, args.width), jnp.float32, 1e-4, 2e-3)
        moved = y.nbytes + num_rows * args.width + 4 * num_rows  # read the product, write e4m3 + scales
        programs = {"xla": jax.jit(functools.partial(swiglu_fp8_reference, dtype=dtype))}
        for variant in args.variants:
            rows, warps = (int(n) for n in variant.split("x"))
            if num_rows % rows == 0:
                programs[f"kernel {variant}"] = jax.jit(functools.partial(
                    swiglu_fp8_gpu, dtype=dtype, rows=rows, num_warps=warps, interpret=interpret))
        want = np.asarray(programs["xla"](y, x_scale, w_scale)[0]).view(np.uint8)
        row = {"num_rows": num_rows, "bytes": moved, "variants": {}}
        for name, program in programs.items():
            got = np.asarray(program(y, x_scale, w_scale)[0]).view(np.uint8)
            seconds = ceiling_seconds(lambda program=program: program(y, x_scale, w_scale)[0], args.repeats,
                                      warmup_seconds=0.0 if args.smoke else 0.5)
            row["variants"][name] = {"us": 1e6 * seconds, "tb_s": moved / seconds / 1e12,
                                     "of_copy": moved / seconds / copy,
                                     "same_as_xla": float((got == want).mean())}
            print(f"rows {num_rows:5d} {name:14s}: {1e6 * seconds:8.1f} us, {moved / seconds / 1e12:5.2f} TB/s "
                  f"({moved / seconds / copy:.2f} of copy), same bytes as XLA {(got == want).mean():.4f}",
                  flush=True)
        report["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
