"""Decode step time at TP = 1 vs TP = 2 (tensor parallelism), random weights of an 8B shape.

For each TP size: random bf16 params drawn straight into their shardings (the same values at
every TP size), the engine's runner with that sharding plan, then for each batch size one decode
step (sharded forward over the paged cache + sampling on replicated logits, the engine's own
compiled programs) with every sequence holding `--context` tokens. Reports two times:
- `step_ms`: the median of single steps, each waited for (what a synchronous engine sees,
  including the host's launch time);
- `pipelined_ms`: `--repeats` steps dispatched back to back and waited for once, per step (what
  the engine's async scheduling sees: the device's step time once launches overlap).

    python3 benchmarks/tp_decode_step.py --tp 1 2 --batches 1 64 --context 1024 --out tp.json
    python3 benchmarks/tp_decode_step.py --smoke   # CPU, 2 fake devices, tiny shapes
"""

import os
import sys

if "--smoke" in sys.argv and "XLA_FLAGS" not in os.environ:  # before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size, median_seconds  # noqa: E402
from jaxpaged.config import ModelConfig  # noqa: E402
from jaxpaged.models.params import random_params  # noqa: E402
from jaxpaged.runner import ModelRunner  # noqa: E402
from jaxpaged.sharding import ShardingPlan  # noqa: E402

SHAPES = {  # Hugging Face config fields (weights are random)
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  tie_word_embeddings=False),
}


def decode_steps(config: ModelConfig, tp: int, batches: list[int], context: int, page_size: int,
                 dtype, repeats: int) -> list[dict]:
    plan = ShardingPlan.build(config, tp)
    params = random_params(config, dtype, seed=0, plan=plan)
    pages_per_seq = -(-(context + 1) // page_size)
    rows = []
    for batch in batches:
        bucket = max(batch, 8)
        runner = ModelRunner(config, params, num_pages=batch * pages_per_seq, page_size=page_size,
                             max_num_seqs=batch, pages_per_seq=pages_per_seq,
                             max_model_len=context + 1, token_buckets=(bucket,),
                             attention_backend="auto", kv_dtype=dtype, plan=plan)
        compiles, compile_seconds = runner.warmup()
        inputs, _ = decode_batch_inputs(batch, context, config.vocab_size, page_size, bucket)
        seconds = median_seconds(lambda: runner.execute(inputs, apply_penalties=False, draw="greedy"),
                                  repeats)
        pipelined, dispatch = pipelined_seconds(runner, inputs, repeats)
        rows.append({"tp": tp, "batch": batch, "context": context, "step_ms": 1e3 * seconds,
                     "pipelined_ms": 1e3 * pipelined, "dispatch_ms": 1e3 * dispatch,
                     "compile_seconds": compile_seconds, "programs": compiles,
                     "padding": list(plan.notes)})
        runner = None  # free this batch size's KV cache before the next one
    del params
    return rows


def pipelined_seconds(runner: ModelRunner, inputs, steps: int) -> tuple[float, float]:
    """Per-step wall time of `steps` steps dispatched without waiting, then waited for once; and
    the host's per-step dispatch time within it (close to the first: the host is the bottleneck)."""
    runner.fetch(runner.dispatch(inputs, apply_penalties=False, draw="greedy"))
    start = time.perf_counter()
    for _ in range(steps):
        out = runner.dispatch(inputs, apply_penalties=False, draw="greedy")
    dispatched = time.perf_counter()
    runner.fetch(out)
    return (time.perf_counter() - start) / steps, (dispatched - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=list(SHAPES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=None,
                        help="default: the engine's for the platform (EngineConfig.page_size)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (2 fake devices)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.context, args.repeats, args.batches = "smoke", 32, 2, [1, 4]
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    config = ModelConfig.from_hf_config({"model_type": "llama", "rms_norm_eps": 1e-5,
                                         "rope_theta": 500000.0, "max_position_embeddings": 131072,
                                         **SHAPES[args.model]})
    device = jax.devices()[0].device_kind
    print(f"{len(jax.devices())} x {device}, {args.model}, {jnp.dtype(dtype).name}", flush=True)
    rows = []
    args.page_size = args.page_size or default_page_size()
    for tp in args.tp:
        for row in decode_steps(config, tp, args.batches, args.context, args.page_size, dtype,
                                args.repeats):
            rows.append(row)
            print(f"TP={tp} batch {row['batch']:4d} ctx {row['context']}: step "
                  f"{row['step_ms']:8.2f} ms, pipelined {row['pipelined_ms']:8.2f} ms "
                  f"(host dispatch {row['dispatch_ms']:.2f} ms) "
                  f"(compile {row['compile_seconds']:.0f} s)", flush=True)
    for batch in args.batches:
        for key in ("step_ms", "pipelined_ms"):
            by_tp = {r["tp"]: r[key] for r in rows if r["batch"] == batch}
            if 1 in by_tp and len(by_tp) > 1:
                print(f"batch {batch} {key}: " + ", ".join(
                    f"TP={tp} {by_tp[1] / ms:.2f}x TP=1's speed" for tp, ms in by_tp.items() if tp != 1))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python3", "benchmarks/tp_decode_step.py", *(argv or sys.argv[1:])]),
            "device": device, "num_devices": len(jax.devices()), "model": args.model,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "dtype": jnp.dtype(dtype).name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
