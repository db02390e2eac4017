"""Where a decode step's device time goes: the GPU kernels of pipelined decode steps, by kind.

Builds the engine's runner for a random-weight model (one bucket per batch size), dispatches
decode steps back to back as the async engine does (every sequence holds `--context` tokens),
and records `--steps` of them with the JAX profiler. With `--prefill-chunks` each step also
prefills new sequences' first chunks of those lengths: an offline run's mixed step. From the
trace's GPU kernel events it reports, per step: the device span (first kernel start to last
kernel end, over the steps), the time a kernel was running, the idle time between kernels, and
the busy time by kind (matmul, attention, other fusions, copies) with the top kernels. Matmul
bandwidth = the weights a step reads (all but the embedding table) over the matmul time.

    python3 benchmarks/decode_profile.py --batches 1 32 --context 1024 --out-dir prof
    python3 benchmarks/decode_profile.py --batches 256 --context 1088 \
        --prefill-chunks 1024 1024 1024 1024 1024 1024 1024 768 --steps 3 --out-dir prof
    python3 benchmarks/decode_profile.py --smoke --out-dir /tmp/prof   # CPU: host events only
"""

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = (  # first match wins; names are the GPU kernels' (cuBLAS, Triton/Pallas, XLA fusions)
    ("attention", re.compile(r"ragged_paged_attention|paged_attention", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|sm90_|sm80_|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("collective", re.compile(r"nccl", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def gpu_kernel_events(trace_dir: Path) -> tuple[list[dict], list[str]]:
    """The 'X' events on the trace's GPU streams (name, ts and dur in microseconds), and the
    names of the GPU rows found."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    # A GPU's rows: one per CUDA stream (the kernels), plus roll-ups ("XLA Ops", "XLA Modules")
    # that would count the same time again: keep the stream rows.
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {key for key, name in threads.items() if name.lower().startswith("stream")}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids
               and e.get("dur") and (not streams or (e["pid"], e.get("tid")) in streams)]
    return kernels, sorted(set(threads.values()))


def busy_time(events: list[dict]) -> float:
    """Microseconds during which at least one kernel ran (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(events: list[dict], steps: int, weight_bytes: int) -> dict:
    if not events:
        return {"kernels": 0}
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in events:
        by_kind[kind_of(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    busy = busy_time(events)
    matmul_us = by_kind.get("matmul", 0.0) / steps
    top = sorted(by_name.items(), key=lambda item: -item[1])[:15]
    return {
        "kernels_per_step": len(events) / steps,
        "span_ms": span / steps / 1e3, "busy_ms": busy / steps / 1e3,
        "idle_ms": (span - busy) / steps / 1e3,
        "by_kind_ms": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
        "matmul_weight_bandwidth_tb_s": weight_bytes / (matmul_us * 1e-6) / 1e12 if matmul_us else None,
        "top_kernels": [{"name": name[:120], "kind": kind_of(name), "ms_per_step": us / steps / 1e3,
                         "calls_per_step": count[name] / steps} for name, us in top],
        "layer_kernels": layer_kernels(events, steps),
        **idle_gaps(events, steps),
    }


def idle_gaps(events: list[dict], steps: int, threshold_us: float = 5.0, top: int = 12) -> dict:
    """Where the idle time is: the gaps of `threshold_us` or more between one kernel's end (the
    latest so far) and the next one's start, their total per step, and the largest of them with
    the kernels on either side (step boundaries, host waits)."""
    gaps, end, last = [], float("-inf"), None
    for e in sorted(events, key=lambda e: e["ts"]):
        if last is not None and e["ts"] - end >= threshold_us:
            gaps.append({"us": e["ts"] - end, "after": last[:80], "before": e["name"][:80]})
        if e["ts"] + e["dur"] >= end:
            end, last = e["ts"] + e["dur"], e["name"]
    return {"large_gaps_ms_per_step": sum(g["us"] for g in gaps) / steps / 1e3,
            "large_gaps_per_step": len(gaps) / steps,
            "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:top]}


def layer_kernels(events: list[dict], steps: int) -> list[dict]:
    """The kernels of one decoder layer in launch order, with each one's duration and the gap
    before it: from after the second launch of the step's first attention kernel (the decode
    kernel, or in a mixed step the KV write) in the middle step to its third (a layer's cycle).
    Empty if the step has fewer than three of them."""
    ordered = sorted(events, key=lambda e: e["ts"])
    per_step = len(ordered) // steps
    step = ordered[per_step * (steps // 2): per_step * (steps // 2 + 1)]
    first = next((e["name"] for e in step if kind_of(e["name"]) == "attention"), None)
    marks = [i for i, e in enumerate(step) if e["name"] == first]
    if len(marks) < 3:
        return []
    rows = []
    for i in range(marks[1] + 1, marks[2] + 1):
        gap = step[i]["ts"] - (step[i - 1]["ts"] + step[i - 1]["dur"])
        rows.append({"name": step[i]["name"][:100], "kind": kind_of(step[i]["name"]),
                     "us": step[i]["dur"], "gap_before_us": gap})
    return rows


def profile_batch(runner, inputs, steps: int, trace_dir: Path,
                  device_inputs: bool = False) -> tuple[list[dict], list[str]]:
    import jax

    if device_inputs:  # copied once: the steps below transfer nothing from the host
        buffers = runner.device_inputs(inputs)
        runner.device_inputs = lambda _: buffers
    for _ in range(3):  # warm: compiled, clocks up, buffers allocated
        out = runner.dispatch(inputs, apply_penalties=False, draw="greedy")
    runner.fetch(out)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            out = runner.dispatch(inputs, apply_penalties=False, draw="greedy")
        runner.fetch(out)
    return gpu_kernel_events(trace_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a shipped config (random weights)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=None,
                        help="default: the engine's for the platform (EngineConfig.page_size)")
    parser.add_argument("--prefill-chunks", type=int, nargs="*", default=[],
                        help="also prefill new sequences' first chunks of these lengths each step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quantization", default=None, help="fp8: FP8 linear weights")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="the runner's sequence slots (default: the batch), e.g. 256 as the "
                             "engine benchmark configures")
    parser.add_argument("--decode-pages-per-iter", type=int, default=None,
                        help="experiment: the GPU decode kernel's pages per loop iteration")
    parser.add_argument("--xla-split-merge", action="store_true",
                        help="experiment: XLA merges the decode kernel's splits after it "
                             "(attention.FUSED_SPLIT_MERGE off)")
    parser.add_argument("--device-inputs", action="store_true",
                        help="experiment: the step inputs go to the device once, before the "
                             "profiled steps (no host-to-device copies between steps)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args(argv)
    args.argv = argv
    from jaxpaged import attention
    from pallas_kernels import gpu

    saved_defaults, saved_merge = dict(gpu.DECODE_DEFAULTS), attention.FUSED_SPLIT_MERGE
    attention.FUSED_SPLIT_MERGE = not args.xla_split_merge
    if args.decode_pages_per_iter:  # traced into the programs below; restored on the way out
        gpu.DECODE_DEFAULTS["pages_per_iter"] = args.decode_pages_per_iter
    try:
        return profile(args, config_for(args))
    finally:
        gpu.DECODE_DEFAULTS.update(saved_defaults)
        attention.FUSED_SPLIT_MERGE = saved_merge


def config_for(args):
    from jaxpaged.config import ModelConfig
    from jaxpaged.model_source import resolve_model

    if args.smoke:
        args.context, args.batches, args.steps = 32, [1, 4], 2
        args.prefill_chunks = [min(n, 24) for n in args.prefill_chunks]
        return ModelConfig(model_type="llama", vocab_size=256, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_q_heads=4, num_kv_heads=2,
                           head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)
    return resolve_model(args.model, "dummy").model_config()


def profile(args, config) -> int:
    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import decode_batch_inputs, decode_weight_bytes, default_page_size
    from jaxpaged.models.params import random_params
    from jaxpaged.runner import ModelRunner

    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    args.page_size = args.page_size or default_page_size()
    params = random_params(config, dtype, quantization=args.quantization)
    weight_bytes = decode_weight_bytes(params, config)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python3 benchmarks/decode_profile.py " + " ".join(args.argv or sys.argv[1:]),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "model": args.model if not args.smoke else "smoke", "context": args.context,
              "prefill_chunks": args.prefill_chunks, "quantization": args.quantization,
              "weight_bytes_per_step": weight_bytes, "batches": []}
    for batch in args.batches:
        chunks = tuple(args.prefill_chunks)
        tokens = batch + sum(chunks)
        bucket = max(batch, 8) if not chunks else 1 << (tokens - 1).bit_length()
        max_num_seqs = max(batch + len(chunks), args.max_num_seqs or 0)
        # Rows as the runner has them in its one (so smallest) bucket: ModelRunner.seq_slots.
        inputs, pages_per_seq = decode_batch_inputs(batch, args.context, config.vocab_size,
                                                    args.page_size, bucket, min(bucket, max_num_seqs),
                                                    prefill_chunks=chunks)
        runner = ModelRunner(config, params, num_pages=int(inputs.attention.page_indices.max()) + 1,
                             page_size=args.page_size, max_num_seqs=max_num_seqs,
                             pages_per_seq=pages_per_seq,
                             max_model_len=max((args.context, *chunks)) + 1,
                             token_buckets=(bucket,), attention_backend="auto", kv_dtype=dtype,
                             quantization=args.quantization)
        runner.warmup()
        with tempfile.TemporaryDirectory(dir=out) as trace_dir:
            events, rows = profile_batch(runner, inputs, args.steps, Path(trace_dir),
                                         device_inputs=args.device_inputs)
        row = {"batch": batch, "max_num_seqs": max_num_seqs,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "decode_pages_per_iter": args.decode_pages_per_iter,
               "device_inputs": args.device_inputs, "gpu_rows": rows, **summarize(events, args.steps, weight_bytes)}
        report["batches"].append(row)
        runner = None
        if row.get("kernels_per_step"):
            print(f"batch {batch}: span {row['span_ms']:.2f} ms/step, kernels busy "
                  f"{row['busy_ms']:.2f}, idle {row['idle_ms']:.2f}; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["by_kind_ms"].items())
                  + (f"; matmuls read weights at {row['matmul_weight_bandwidth_tb_s']:.2f} TB/s"
                     if row["matmul_weight_bandwidth_tb_s"] else ""), flush=True)
            for k in row["top_kernels"][:8]:
                print(f"    {k['ms_per_step']:7.3f} ms x{k['calls_per_step']:5.1f} {k['kind']:10s} "
                      f"{k['name'][:90]}")
            print(f"  gaps >= 5 us: {row['large_gaps_per_step']:.1f} a step, "
                  f"{row['large_gaps_ms_per_step']:.3f} ms; largest:")
            for g in row["largest_gaps"][:6]:
                print(f"    {g['us']:8.1f} us after {g['after'][:50]} before {g['before'][:50]}")
            print(f"  one layer, {len(row['layer_kernels'])} kernels (us, gap before):")
            for k in row["layer_kernels"]:
                print(f"    {k['us']:7.2f} {k['gap_before_us']:6.2f} {k['kind']:10s} {k['name'][:80]}")
        else:
            print(f"batch {batch}: no GPU kernel events (CPU run)", flush=True)
        (out / "decode_profile.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
