"""Decode step time on an accelerator vs the memory floor, with random weights of real shapes.

Measures, in one run: device-to-device copy bandwidth; then for each model shape and batch size
one decode step (forward over the paged cache + sampling, the engine's compiled programs) at a
given context length. Floor = (weight bytes + KV bytes read) / copy bandwidth.

    python3 benchmarks/gpu_decode_step.py --models llama-3.2-1b llama-3.1-8b --batches 1 32 --context 1024
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxpaged.bench.roofline import copy_bandwidth, decode_batch_inputs, default_page_size, median_seconds
from jaxpaged.config import ModelConfig
from jaxpaged.models.params import random_params
from jaxpaged.runner import ModelRunner

SHAPES = {  # Hugging Face config fields of the public models (weights are random here)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False),
}


def decode_step(name: str, batch: int, context: int, page_size: int) -> dict:
    config = ModelConfig.from_hf_config({"model_type": "llama", "rms_norm_eps": 1e-5,
                                         "rope_theta": 500000.0, "max_position_embeddings": 131072,
                                         **SHAPES[name]})
    params = random_params(config, jnp.bfloat16)
    pages_per_seq = -(-(context + 1) // page_size)
    runner = ModelRunner(config, params, num_pages=batch * pages_per_seq, page_size=page_size,
                         max_num_seqs=batch, pages_per_seq=pages_per_seq, max_model_len=context + 1,
                         token_buckets=(max(batch, 8),), attention_backend="reference",
                         kv_dtype=jnp.bfloat16)
    for i, key in enumerate(jax.random.split(jax.random.key(1), len(runner.kv_pages))):
        shape, kv_dtype = runner.kv_pages[i].shape, runner.kv_pages[i].dtype
        runner.kv_pages[i] = None  # one layer at a time: never two whole caches alive
        runner.kv_pages[i] = jax.random.normal(key, shape, kv_dtype)
    compiles, compile_seconds = runner.warmup()
    inputs, _ = decode_batch_inputs(batch, context, config.vocab_size, page_size, max(batch, 8))
    seconds = median_seconds(lambda: runner.execute(inputs, apply_penalties=False, draw="greedy"), 20)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes = config.num_layers * batch * context * 2 * config.num_kv_heads * config.head_dim * 2
    del runner, params
    return {"model": name, "batch": batch, "context": context, "step_ms": 1e3 * seconds,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "compile_seconds": compile_seconds,
            "programs": compiles}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=None,
                        help="default: the engine's for the platform (EngineConfig.page_size)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    print(f"device {jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    args.page_size = args.page_size or default_page_size()
    for name in args.models:
        for batch in args.batches:
            row = decode_step(name, batch, args.context, args.page_size)
            row["floor_ms"] = 1e3 * (row["weight_bytes"] + row["kv_bytes"]) / bandwidth
            row["ratio_to_floor"] = row["step_ms"] / row["floor_ms"]
            rows.append(row)
            print(f"{name:13s} batch {batch:4d} ctx {args.context}: step {row['step_ms']:8.2f} ms, "
                  f"floor {row['floor_ms']:7.2f} ms ({row['ratio_to_floor']:.2f}x), "
                  f"compile {row['compile_seconds']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python3", "benchmarks/gpu_decode_step.py", *(argv or sys.argv[1:])]),
                                              "device": jax.devices()[0].device_kind,
                                              "copy_bandwidth_bytes_s": bandwidth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
