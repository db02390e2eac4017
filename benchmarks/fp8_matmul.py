"""The linear layers of an 8B decoder in bf16 and in FP8 (`jaxpaged.models.quant.linear`).

For each weight shape of Llama-3.1-8B (q/k/v merged, o, gate/up, down) and each row count (a
decode batch, a mixed offline step), times one `linear` in bf16 and in fp8 (activation
quantization and output scaling included, as the model runs it), and names the kernels XLA
compiled it to (cuBLAS / cuBLASLt FP8 custom calls or Triton fusions). Prints a table, saves JSON.

    python3 benchmarks/fp8_matmul.py --out benchmarks/results/fp8_matmul.json
    python3 benchmarks/fp8_matmul.py --smoke --out /tmp/fp8.json     # CPU, tiny shapes
"""

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (4096, (6144,)), "o": (4096, (4096,)), "gate_up": (4096, (2, 14336)),
          "down": (14336, (4096,))}


def kernels_of(compiled_text: str) -> list[str]:
    """The custom-call targets and fusion kinds in an optimized HLO module."""
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled_text)
    fusions = re.findall(r"kind=k(\w+)", compiled_text)
    return sorted(set(targets)) + sorted({f"fusion:{f}" for f in fusions})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 8448])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import ceiling_seconds
    from jaxpaged.models.quant import fp8_linear, quantize_weight

    shapes = SHAPES
    if args.smoke:
        shapes = {name: (k // 64, tuple(max(1, n // 64) for n in out)) for name, (k, out) in SHAPES.items()}
        args.rows, args.repeats = [4, 32], 3
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    rows_out = []
    for name, (k, out) in shapes.items():
        w = (0.02 * jax.random.normal(jax.random.key(0), (k, *out), jnp.float32)).astype(dtype)
        wq = jax.jit(quantize_weight)(w)
        n = 1
        for d in out:
            n *= d
        for m in args.rows:
            x = jax.random.normal(jax.random.key(1), (m, k), dtype)
            row = {"name": name, "rows": m, "in": k, "out": list(out)}
            for kind, weight, fn in (
                    ("bf16", w, lambda x, w: jnp.tensordot(x, w, axes=1)),
                    ("fp8", wq, functools.partial(fp8_linear, quantize_activations=True)),
                    ("fp8_weight_only", wq, functools.partial(fp8_linear, quantize_activations=False))):
                begin = time.perf_counter()
                program = jax.jit(fn).lower(x, weight).compile()
                compile_seconds = time.perf_counter() - begin
                seconds = ceiling_seconds(functools.partial(program, x, weight), args.repeats)
                weight_bytes = sum(a.nbytes for a in jax.tree.leaves(weight))
                row[kind] = {"us": 1e6 * seconds, "tflop_s": 2 * m * k * n / seconds / 1e12,
                             "weight_tb_s": weight_bytes / seconds / 1e12,
                             "compile_s": compile_seconds, "kernels": kernels_of(program.as_text())}
            rows_out.append(row)
            print(f"{name:8s} rows {m:5d}: " + " | ".join(
                f"{kind} {row[kind]['us']:8.1f} us ({row[kind]['tflop_s']:6.1f} TFLOP/s, "
                f"{row[kind]['weight_tb_s']:.2f} TB/s, compiled in {row[kind]['compile_s']:.1f} s)" for kind in ("bf16", "fp8", "fp8_weight_only")),
                flush=True)
    for kind in ("fp8", "fp8_weight_only"):
        print(f"{kind} kernels:", sorted({k for row in rows_out for k in row[kind]["kernels"]}))
    report = {"command": "python3 benchmarks/fp8_matmul.py " + " ".join(argv or sys.argv[1:]),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
