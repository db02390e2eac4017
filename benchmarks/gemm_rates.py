"""The bf16 matmul rate the 8B model's linear layers get, short and sustained.

The offline floor (`jaxpaged.bench.roofline.offline_floor`) divides the run's matmul flops by
the rate of a short burst of 8192^3 matmuls. This script asks how far the model's own GEMMs are
from that rate, and whether the card holds it for as long as an offline run lasts:

- burst: each linear of Llama-3.1-8B (q/k/v, o, gate/up, down) at the given row counts, with
  the weight stored [in, out] (as the model stores it) and [out, in], and gate/up also as two
  separate weights; the best of a few back-to-back samples, as `roofline.matmul_rate` times;
- the MLP: the model's SwiGLU MLP compiled as it is, with XLA's cuBLAS fallback off (to see
  whether Triton GEMMs would take SiLU x up into the down GEMM; on the H100 XLA kept cuBLAS
  and a separate SiLU x up under every option), and with XLA's Triton GEMMs off;
- sustained: 8192^3 matmuls, then a chain of decoder-layer GEMMs (with SiLU x up between
  gate/up and down, as the model runs them), each back to back for `--seconds`, timed in
  windows, with the SM clock, power and throttle reasons sampled by `nvidia-smi` meanwhile.

    python3 benchmarks/gemm_rates.py --out gemm_rates.json
    python3 benchmarks/gemm_rates.py --smoke --out /tmp/gemm_rates.json     # CPU, tiny shapes
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_clocks

from gpu_clocks import SmiSampler, summarize  # noqa: E402

HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 6144  # Llama-3.1-8B


def in_out(x, w):
    """The model's layout: x [T, in] times w [in, out]."""
    import jax.numpy as jnp

    return jnp.tensordot(x, w, axes=1)


def out_in(x, w):
    """x [T, in] times w [out, in], contracted on its last axis."""
    import jax

    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def two_weights(x, w):
    """x [T, in] times w [2, in, F], one GEMM per half (gate and up as two weights): the two
    [T, F] products (not concatenated, which the model would not need)."""
    import jax.numpy as jnp

    return jnp.tensordot(x, w[0], axes=1), jnp.tensordot(x, w[1], axes=1)


# Each layout: its product, and the weight it takes made from the [in, out] weight.
LAYOUTS = {"in_out": (in_out, lambda w: w), "out_in": (out_in, lambda w: w.T),
           "two_weights": (two_weights, lambda w: w.reshape(w.shape[0], 2, -1).transpose(1, 0, 2))}


def burst_rows(rows: list[int], hidden: int, intermediate: int, qkv: int, dtype, repeats: int,
               warmup: float) -> list[dict]:
    """Each linear at each row count, in each weight layout: the best of `repeats` samples."""
    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import ceiling_seconds

    shapes = {"qkv": (hidden, qkv), "o": (hidden, hidden), "gate_up": (hidden, 2 * intermediate),
              "down": (intermediate, hidden)}
    out = []
    for name, (k, n) in shapes.items():
        w_in_out = (0.02 * jax.random.normal(jax.random.key(0), (k, n), jnp.float32)).astype(dtype)
        layouts = ("in_out", "out_in", "two_weights") if name == "gate_up" else ("in_out", "out_in")
        for m in rows:
            x = jax.random.normal(jax.random.key(1), (m, k), dtype)
            row = {"name": name, "rows": m, "in": k, "out": n}
            for layout in layouts:
                fn, make = LAYOUTS[layout]
                w = jax.jit(make)(w_in_out)
                program = jax.jit(fn).lower(x, w).compile()
                # a tuple's last array is ready when the whole program is
                seconds = ceiling_seconds(lambda: jax.tree.leaves(program(x, w))[-1], repeats,
                                          warmup_seconds=warmup)
                row[layout] = {"us": 1e6 * seconds, "tflop_s": 2 * m * k * n / seconds / 1e12}
                del w
            out.append(row)
            print(f"{name:8s} rows {m:6d}: " + " | ".join(
                f"{layout} {row[layout]['us']:8.1f} us {row[layout]['tflop_s']:6.1f} TFLOP/s"
                for layout in layouts), flush=True)
    return out


MLP_OPTIONS = {"default": None, "no_cublas_fallback": {"xla_gpu_cublas_fallback": False},
               "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False}}


def mlp_rows(rows: list[int], hidden: int, intermediate: int, dtype, repeats: int,
             warmup: float) -> list[dict]:
    """The model's SwiGLU MLP (`layers.swiglu_mlp`: gate/up, SiLU x up, down) compiled with each
    of MLP_OPTIONS: whether letting XLA fuse SiLU x up into a Triton down GEMM beats cuBLAS."""
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import ceiling_seconds
    from jaxpaged.models.layers import swiglu_mlp

    keys = jax.random.split(jax.random.key(3), 3)
    gate_up = (0.02 * jax.random.normal(keys[0], (hidden, 2, intermediate), jnp.float32)).astype(dtype)
    down = (0.02 * jax.random.normal(keys[1], (intermediate, hidden), jnp.float32)).astype(dtype)
    mlp = jax.jit(lambda h, g, d: swiglu_mlp(h, g, d, None))  # bf16 rows: no FP8 ops needed
    out = []
    for m in rows:
        h = jax.random.normal(keys[2], (m, hidden), dtype)
        row = {"rows": m}
        for name, options in MLP_OPTIONS.items():
            program = mlp.lower(h, gate_up, down).compile(compiler_options=options)
            text = program.as_text()
            seconds = ceiling_seconds(lambda: program(h, gate_up, down), repeats, warmup_seconds=warmup)
            row[name] = {"us": 1e6 * seconds,
                         "tflop_s": 2 * m * 3 * hidden * intermediate / seconds / 1e12,
                         "fusions": dict(collections.Counter(re.findall(r"kind=k(\w+)", text))),
                         "triton_gemms": text.count("__triton_gemm"),
                         "cublas_calls": len(re.findall(r'custom_call_target="__cublas', text))}
        out.append(row)
        print(f"mlp rows {m:6d}: " + " | ".join(
            f"{name} {row[name]['us']:8.1f} us ({row[name]['triton_gemms']} triton, "
            f"{row[name]['cublas_calls']} cublas, fusions {row[name]['fusions']})" for name in MLP_OPTIONS),
            flush=True)
    return out


def sustained(name: str, fn, flops_per_call: float, seconds: float, window: float, smi: SmiSampler) -> dict:
    """Calls `fn()` back to back for `seconds` (`roofline.rate_windows`): each window's rate,
    with the nvidia-smi samples taken during it."""
    from jaxpaged.bench.roofline import rate_windows

    found = rate_windows(fn, flops_per_call, seconds, window)
    begin = found[0]["start"]
    windows = [{"t": w["start"] - begin, "tflop_s": w["rate"] / 1e12,
                "smi": summarize(smi.between(w["start"], w["end"]))} for w in found]
    rates = [w["tflop_s"] for w in windows]
    first, last = rates[: max(1, len(rates) // 10)], rates[-max(1, len(rates) // 4):]
    result = {"name": name, "seconds": seconds, "windows": windows,
              "first_tflop_s": sum(first) / len(first), "last_quarter_tflop_s": sum(last) / len(last),
              "best_tflop_s": max(rates), "mean_tflop_s": sum(rates) / len(rates),
              "smi": summarize(smi.between(found[0]["start"], found[-1]["end"]))}
    print(f"sustained {name}: first {result['first_tflop_s']:.0f}, best {result['best_tflop_s']:.0f}, "
          f"mean {result['mean_tflop_s']:.0f}, last quarter {result['last_quarter_tflop_s']:.0f} TFLOP/s; "
          f"nvidia-smi over the run: {result['smi']}", flush=True)
    return result


def layer_chain(rows: int, layers: int, hidden: int, intermediate: int, qkv: int, dtype):
    """A jitted chain of `layers` decoder layers' GEMMs (q/k/v, o, gate/up, SiLU x up, down,
    residual adds), one weight set shared by all (the chain is compute-bound), and its flops."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(2), 5)
    def weight(key, shape):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    w = {"qkv": weight(keys[0], (hidden, qkv)), "o": weight(keys[1], (hidden, hidden)),
         "gate_up": weight(keys[2], (hidden, 2, intermediate)), "down": weight(keys[3], (intermediate, hidden))}
    x = jax.random.normal(keys[4], (rows, hidden), dtype)

    @jax.jit
    def chain(x, w):
        for _ in range(layers):
            q = jnp.tensordot(x, w["qkv"], axes=1)[:, :hidden]  # stands in for attention's output
            x = x + jnp.tensordot(q, w["o"], axes=1)
            gate_up = jnp.tensordot(x, w["gate_up"], axes=1)
            x = x + jnp.tensordot(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], w["down"], axes=1)
        return x

    flops = 2 * rows * layers * (hidden * qkv + hidden * hidden + 3 * hidden * intermediate)
    return (lambda: chain(x, w)), flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="each sustained run's length")
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--chain-layers", type=int, default=8)
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized shapes and runs")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import matmul_rate, square_matmul

    hidden, intermediate, qkv, n = HIDDEN, INTERMEDIATE, QKV, 8192
    dtype, warmup = jnp.bfloat16, 1.0  # warm-up seconds before each timing (clocks rise)
    if args.smoke:
        hidden, intermediate, qkv, n = 64, 224, 96, 256
        args.rows, args.repeats, args.seconds, args.window, args.chain_layers = [32], 2, 0.4, 0.1, 2
        dtype, warmup = jnp.float32, 0.01
    report = {"command": "python3 " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "matmul_n": n, "burst_matmul_tflop_s": matmul_rate(n) / 1e12}
    print(f"{report['device']}: burst {n}^3 matmul {report['burst_matmul_tflop_s']:.0f} TFLOP/s", flush=True)
    if not args.skip_burst:
        report["burst"] = burst_rows(args.rows, hidden, intermediate, qkv, dtype, args.repeats, warmup)
    report["mlp"] = mlp_rows(args.rows, hidden, intermediate, dtype, args.repeats, warmup)
    with SmiSampler() as smi:
        report["sustained"] = [sustained(f"{n}^3 matmul", square_matmul(n, dtype), 2 * n ** 3,
                                         args.seconds, args.window, smi)]
        rows = max(args.rows) if args.smoke else 8192
        fn, flops = layer_chain(rows, args.chain_layers, hidden, intermediate, qkv, dtype)
        report["sustained"].append(sustained(f"{args.chain_layers} layers' GEMMs, {rows} rows", fn, flops,
                                             args.seconds, args.window, smi))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
