"""Llama-3.1-8B-shaped (random bf16 weights) on one H100: roofline, jaxpaged, transformers, one run.

Parts, each in its own process so JAX and torch never hold GPU memory at the same time, each
writing `PART.json` to --out-dir as soon as it is done (a run cut short keeps what finished):

1. `hf`: transformers `generate` (torch on the GPU, bf16, random weights of the same config,
   sdpa attention) on the first --hf-prompts prompts of the same workload, in static batches of
   --hf-batch: the baseline.
2. `jax`: device-to-device copy bandwidth and bf16 matmul rate (a burst, and held for seconds,
   which on an H100 is the power cap's rate); the decode floor (weights read
   per step, the embedding table excepted since decode gathers only its rows, + KV bytes at
   ctx 1024, over the copy bandwidth); decode step time at ctx 1024 for each --batches, split
   into the compiled forward, the sampler and the rest (dispatch + the sampled ids' trip to the
   host); then jaxpaged offline on `random` --input-len in / --output-len out, --num-prompts
   prompts, EOS ignored, counting XLA compiles during the run (must be 0), with the workload's
   floor at the measured rates (`roofline.offline_floor`: its matmuls and attention at the
   matmul rate, burst and held, plus the decodes' KV reads at the copy bandwidth; bf16 weights
   only) and the SM clock and power nvidia-smi saw during the run; then (--prefix-cache)
   issue 7's workload: shared-prefix (32 groups x 16 requests, 1000-token prefix, 100-token
   suffix) and a no-sharing workload of the same sizes, prefix caching off vs on (one engine,
   the cache reset and toggled between settings); and the decode step timed through the whole
   engine (async scheduling on) at each --batches.
3. the summary: `h100_llama8b.json` and `h100_llama8b.md` in --out-dir.

    python3 benchmarks/h100_llama8b.py --out-dir $OUT                 # on the H100
    python3 benchmarks/h100_llama8b.py --smoke --out-dir /tmp/h100    # CPU, tiny shapes, minutes
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # decode_profile

from gpu_clocks import SmiSampler  # noqa: E402
from gpu_clocks import summarize as summarize_clocks  # noqa: E402
from jaxpaged.bench.roofline import median_seconds, offline_floor  # noqa: E402  (numpy only; JAX loads later)

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
               "torch_dtype": "float32"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--part", choices=["all", "hf", "jax"], default="all")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--token-buckets", type=int, nargs="+", default=None,
                        help="the engine's token buckets (default: the engine's, powers of two "
                             "from 8 up to --max-num-batched-tokens)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--quantization", default=None,
                        help="fp8: FP8 linear weights (the engine's --quantization; the baseline stays bf16)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="the engine's --kv-cache-dtype (auto: bf16; fp8: one byte per value)")
    parser.add_argument("--page-size", type=int, default=None,
                        help="the engine's page size (default: the engine's for the platform)")
    parser.add_argument("--offline-seconds", type=float, default=240,
                        help="stop the offline run after this long and report what finished")
    parser.add_argument("--hf-prompts", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--prefix-cache", action="store_true", help="also issue 7's workloads")
    parser.add_argument("--step-breakdown", action="store_true",
                        help="time one offline-like mixed step whole, without attention, and its "
                             "attention alone")
    parser.add_argument("--skip-offline", action="store_true",
                        help="build the engine but skip the offline random workload")
    parser.add_argument("--compare-sync", action="store_true",
                        help="run the offline workload again with async scheduling off")
    parser.add_argument("--engine-decode-steps", type=int, default=32,
                        help="decode steps timed through the whole engine per --batches (0: skip)")
    parser.add_argument("--engine-profile-steps", type=int, default=0,
                        help="after each engine decode timing, trace this many more steps with "
                             "the JAX profiler: the device's busy and idle time inside the engine")
    parser.add_argument("--startup", action="store_true",
                        help="also time process start to ready, cold and warm compilation cache")
    parser.add_argument("--prefix-groups", type=int, default=32)
    parser.add_argument("--prefix-per-group", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--suffix-len", type=int, default=100)
    parser.add_argument("--prefix-output-len", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds since the epoch after which optional parts are skipped")
    parser.add_argument("--xla-split-merge", action="store_true",
                        help="experiment: XLA merges the decode kernel's splits after it "
                             "(attention.FUSED_SPLIT_MERGE off)")
    parser.add_argument("--cudnn-prefill", action="store_true",
                        help="prompts' first chunks attend through cuDNN, not the Pallas prefill "
                             "kernel (attention.CUDNN_PREFILL on)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="rebuild the summary from the part files already in --out-dir")
    args = parser.parse_args(argv)
    if args.smoke:
        tiny = Path(args.out_dir) / "tiny-llama"
        tiny.mkdir(parents=True, exist_ok=True)
        (tiny / "config.json").write_text(json.dumps(TINY_CONFIG))
        args.model, args.num_prompts, args.input_len, args.output_len = str(tiny), 12, 48, 8
        args.batches, args.context, args.max_num_seqs = [1, 4], 64, 8
        args.max_num_batched_tokens, args.token_buckets = 64, [16, 64]
        args.hf_prompts, args.hf_batch = 4, 2
        args.prefix_groups, args.prefix_per_group, args.prefix_len = 2, 3, 40
        args.suffix_len, args.prefix_output_len = 8, 4
        args.engine_decode_steps = 4
    return args


def workload(args):
    from jaxpaged.bench.datasets import random_requests
    from jaxpaged.model_source import resolve_model

    config = resolve_model(args.model, "dummy").model_config()
    return random_requests(args.num_prompts, args.input_len, args.output_len, 0.0,
                           config.vocab_size, seed=0)


# ---- part 1: transformers generate ----------------------------------------------------------

def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpaged.model_source import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_config = resolve_model(args.model, "dummy").hf_config()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                 attn_implementation="sdpa").eval()
    setup = time.perf_counter() - start
    requests = workload(args)[:args.hf_prompts]

    def generate(batch, new_tokens):
        ids = torch.tensor([r.prompt_token_ids for r in batch], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == new_tokens
        return out

    generate(requests[:2], 4)  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    for i in range(0, len(requests), args.hf_batch):
        batch = requests[i:i + args.hf_batch]
        generate(batch, max(r.output_len for r in batch))
        produced += sum(r.output_len for r in batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "num_prompts": len(requests), "batch": args.hf_batch, "setup_seconds": setup,
            "seconds": seconds, "output_tokens": produced, "output_throughput": produced / seconds,
            "request_throughput": len(requests) / seconds}


# ---- part 2: roofline, decode steps, jaxpaged offline -----------------------------------------

def roofline(smoke: bool) -> dict:
    from jaxpaged.bench.roofline import copy_bandwidths, matmul_rate, sustained_matmul_rate

    n_bytes = (64 << 20) if smoke else (2 << 30)
    n = 1024 if smoke else 8192
    copies = copy_bandwidths(n_bytes)
    burst = matmul_rate(n)  # first: right after seconds at the power cap, a burst reads low
    sustained = (sustained_matmul_rate(n, seconds=0.2, window=0.05) if smoke
                 else sustained_matmul_rate(n))
    return {"copy_bandwidth_bytes_s": max(copies.values()), "copy_kinds_bytes_s": copies,
            "matmul_flop_s": burst, "sustained_matmul_flop_s": sustained, "matmul_n": n,
            "copy_bytes": n_bytes}


def decode_steps(args, params, config, dtype, bandwidth: float) -> list[dict]:
    """One decode step per batch size at ctx `args.context`, each part timed on its own."""
    import gc

    from jaxpaged.bench.roofline import decode_weight_bytes

    weight_bytes = decode_weight_bytes(params, config)
    rows = []
    for batch in sorted(args.batches, reverse=True):  # the largest first, into unfragmented memory
        try:
            rows.append(decode_step(args, params, config, dtype, bandwidth, batch, weight_bytes))
        except Exception as error:  # noqa: BLE001 - an OOM at one batch must not lose the others
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            rows.append({"batch": batch, "context": args.context,
                         "error": str(error).splitlines()[0][:300], "memory": memory_stats()})
            print(f"decode batch {batch}: out of memory ({rows[-1]['memory']})", flush=True)
        gc.collect()
    return sorted(rows, key=lambda row: row["batch"])


def memory_stats() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def program_bytes(program) -> dict:
    """XLA's own account of a compiled program's device memory."""
    try:
        analysis = program.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "alias_size_in_bytes")
    return {name: int(getattr(analysis, name)) for name in names if hasattr(analysis, name)}


def decode_step(args, params, config, dtype, bandwidth, batch, weight_bytes) -> dict:
    import jax
    import numpy as np

    from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size
    from jaxpaged.engine import resolve_kv_dtype
    from jaxpaged.runner import ModelRunner

    page_size = default_page_size()
    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, dtype)
    pages_per_seq = -(-(args.context + 1) // page_size)
    bucket = max(batch, 16)
    runner = ModelRunner(config, params, num_pages=batch * pages_per_seq, page_size=page_size,
                         max_num_seqs=batch, pages_per_seq=pages_per_seq,
                         max_model_len=args.context + 1, token_buckets=(bucket,),
                         attention_backend=args.attention_backend, kv_dtype=kv_dtype,
                         quantization=args.quantization)
    # Random (not zero) KV, replaced one layer at a time: building a whole second cache while the
    # zeros are alive needs twice the KV memory (that OOMed at batch 256 on the H100).
    for i, key in enumerate(jax.random.split(jax.random.key(1), len(runner.kv_pages))):
        shape = runner.kv_pages[i].shape
        runner.kv_pages[i] = None
        runner.kv_pages[i] = jax.random.normal(key, shape, dtype).astype(kv_dtype)
    programs, compile_seconds = runner.warmup()
    inputs, _ = decode_batch_inputs(batch, args.context, config.vocab_size, page_size, bucket)
    # What the engine runs for this step (its decode-only program where the backend has one),
    # and the mixed-batch program of the same bucket for comparison.
    forward = runner._decode_programs.get(bucket, runner._forward_programs[bucket])
    mixed = runner._forward_programs[bucket]
    sample = runner._sample_programs[False, False, "greedy", runner.seq_slots(bucket)]
    print(f"decode batch {batch}: compiled; forward {program_bytes(forward)}, sampler "
          f"{program_bytes(sample)}, device {memory_stats()}", flush=True)
    repeats = 5 if args.smoke else 30
    step = median_seconds(lambda: runner.execute(inputs, apply_penalties=False, draw="greedy"),
                          repeats)

    forward_buffer, sampling_buffer = runner.device_inputs(inputs)

    def forward_only(program=forward):
        logits, _, runner.kv_pages = program(runner.params, runner.kv_pages, forward_buffer,
                                             runner._last_token_ids)
        logits.block_until_ready()
        return logits

    forward_s = median_seconds(forward_only, repeats)
    mixed_s = median_seconds(lambda: forward_only(mixed), repeats)
    logits = forward_only()
    sample_s = median_seconds(lambda: jax.block_until_ready(sample(logits, sampling_buffer)),
                              repeats)
    kv_bytes = (config.num_layers * batch * args.context * 2 * config.num_kv_heads
                * config.head_dim * np.dtype(kv_dtype).itemsize)
    floor = (weight_bytes + kv_bytes) / bandwidth
    row = {"batch": batch, "context": args.context, "step_ms": 1e3 * step,
           "forward_ms": 1e3 * forward_s, "mixed_program_forward_ms": 1e3 * mixed_s,
           "decode_program": bucket in runner._decode_programs, "sample_ms": 1e3 * sample_s,
           "other_ms": 1e3 * (step - forward_s - sample_s), "floor_ms": 1e3 * floor,
           "ratio_to_floor": step / floor, "forward_ratio_to_floor": forward_s / floor,
           "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "programs": programs,
           "compile_seconds": compile_seconds, "forward_program_bytes": program_bytes(forward),
           "sample_program_bytes": program_bytes(sample), "memory": memory_stats()}
    print(f"decode batch {batch:4d} ctx {args.context}: step {1e3 * step:7.2f} ms "
          f"(forward {1e3 * forward_s:.2f}, mixed-batch program {1e3 * mixed_s:.2f}, sample "
          f"{1e3 * sample_s:.2f}) | floor "
          f"{1e3 * floor:.2f} ms | {step / floor:.2f}x | forward temp "
          f"{row['forward_program_bytes'].get('temp_size_in_bytes', 0) / 2**30:.1f} GiB", flush=True)
    return row


def engine_kwargs(args) -> dict:
    """The engine of the offline and prefix-cache runs (and of the start-up measurement)."""
    max_model_len = args.input_len + args.output_len + 16
    if args.prefix_cache:
        max_model_len = max(max_model_len, args.prefix_len + args.suffix_len + args.prefix_output_len + 16)
    if args.engine_decode_steps:  # room for engine_decode's requests
        max_model_len = max(max_model_len, args.context + args.engine_decode_steps
                            + args.engine_profile_steps + 48)
    return dict(load_format="dummy", dtype="float32" if args.smoke else "bfloat16",
                max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                token_buckets=tuple(args.token_buckets) if args.token_buckets else None,
                gpu_memory_utilization=args.gpu_memory_utilization,
                attention_backend=args.attention_backend, page_size=args.page_size,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)


def run_jax(args) -> dict:
    import gc

    import jax
    import jax.numpy as jnp

    from jaxpaged import attention as attention_module
    from jaxpaged.attention import resolve_backend
    from jaxpaged.bench.datasets import random_requests, shared_prefix_requests
    from jaxpaged.bench.throughput import engine_summary, run_offline
    from jaxpaged.llm import LLM
    from jaxpaged.model_source import resolve_model
    from jaxpaged.models.params import random_params

    attention_module.FUSED_SPLIT_MERGE = not args.xla_split_merge
    attention_module.CUDNN_PREFILL = attention_module.CUDNN_PREFILL or args.cudnn_prefill
    out = Path(args.out_dir)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
              "attention_backend": resolve_backend(args.attention_backend, jax.devices()[0].platform),
              "fused_split_merge": attention_module.FUSED_SPLIT_MERGE,
              "first_chunk_attention": attention_module.first_chunk_backend(
                  args.attention_backend, jax.devices()[0].platform)}

    def save():
        (out / "jax.json").write_text(json.dumps(report, indent=2))

    report["roofline"] = roofline(args.smoke)
    bw = report["roofline"]["copy_bandwidth_bytes_s"]
    print(f"{report['device']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul "
          f"{report['roofline']['matmul_flop_s'] / 1e12:.0f} TFLOP/s", flush=True)
    save()
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    config = resolve_model(args.model, "dummy").model_config()
    params = random_params(config, dtype, quantization=args.quantization)
    report["decode"] = decode_steps(args, params, config, dtype, bw)
    save()
    if args.step_breakdown:
        report["mixed_step"] = mixed_step_breakdown(args, params, config, dtype,
                                                    report["roofline"]["matmul_flop_s"])
    del params
    gc.collect()
    save()

    engine_args = engine_kwargs(args)
    utilizations = [args.gpu_memory_utilization, 0.6] if not args.smoke else [0.9]
    for utilization in utilizations:
        engine_args["gpu_memory_utilization"] = utilization
        start = time.perf_counter()
        llm = LLM(args.model, **engine_args)
        report["engine"] = engine_summary(llm.engine)
        report["engine"]["setup_seconds"] = time.perf_counter() - start
        report["engine"]["gpu_memory_utilization"] = utilization
        report["engine"]["memory_after_warmup"] = memory_stats()
        report["engine"]["forward_program_bytes"] = {
            b: program_bytes(p) for b, p in llm.engine.runner._forward_programs.items()}
        print(f"engine ready in {report['engine']['setup_seconds']:.1f} s "
              f"({llm.engine.num_compiles} programs, {llm.engine.pages.num_pages} pages, "
              f"utilization {utilization}, memory {memory_stats()})", flush=True)
        if args.skip_offline:
            break
        try:
            with SmiSampler() as clocks:
                report["offline"] = run_offline(llm.engine, workload(args), ignore_eos=True,
                                                max_seconds=args.offline_seconds)
            if clocks.samples:  # none without nvidia-smi
                report["offline_gpu_clocks"] = summarize_clocks(clocks.samples)
            break
        except Exception as error:  # noqa: BLE001
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            report.setdefault("engine_oom", []).append(
                {"gpu_memory_utilization": utilization, "error": str(error).splitlines()[0][:300],
                 "memory": memory_stats()})
            print(f"offline run out of memory at utilization {utilization}", flush=True)
            save()
            del llm
            gc.collect()
    if not args.skip_offline:
        print_offline("offline random", report["offline"])
        if not args.quantization:  # the floor takes the bf16 matmul rate: burst, and sustained
            for key, rate in (("offline_floor", "matmul_flop_s"),
                              ("offline_floor_sustained", "sustained_matmul_flop_s")):
                report[key] = offline_floor(
                    config, num_prompts=args.num_prompts, input_len=args.input_len,
                    output_len=args.output_len, matmul_flop_s=report["roofline"][rate], copy_bytes_s=bw,
                    kv_itemsize=jnp.dtype(report["engine"]["kv_cache_dtype"]).itemsize)
    save()
    if args.compare_sync and not args.skip_offline and (args.deadline is None or time.time() < args.deadline):
        engine = llm.engine
        engine.async_scheduling, before = False, engine.async_scheduling
        assert llm.reset_prefix_cache()  # the same prompts again: no hits from the first run
        report["offline_sync"] = run_offline(engine, workload(args), ignore_eos=True,
                                             max_seconds=args.offline_seconds,
                                             request_prefix="sync")
        engine.async_scheduling = before
        print_offline("offline random, async scheduling off", report["offline_sync"])
        save()

    if args.engine_decode_steps and (args.deadline is None or time.time() < args.deadline):
        decode_rows = {row["batch"]: row for row in report["decode"]}
        report["engine_decode"] = engine_decode(llm.engine, args, decode_rows, config.vocab_size)
        save()

    if args.prefix_cache and (args.deadline is None or time.time() < args.deadline):
        vocab = config.vocab_size
        shared = shared_prefix_requests(args.prefix_groups, args.prefix_per_group, args.prefix_len,
                                        args.suffix_len, args.prefix_output_len, vocab, seed=1)
        unique = random_requests(len(shared), args.prefix_len + args.suffix_len,
                                 args.prefix_output_len, 0.0, vocab, seed=2)
        runs = report["prefix_cache"] = {}
        pages = llm.engine.pages
        # One engine, caching toggled: both settings run the same compiled programs and pages.
        for caching in (False, True):
            assert llm.reset_prefix_cache()
            pages.enable_prefix_caching = caching
            warm = random_requests(4, 64, 4, 0.0, vocab, seed=3)  # first executions, not measured
            run_offline(llm.engine, warm, ignore_eos=True, request_prefix=f"warm-{caching}")
            for name, requests in (("shared-prefix", shared), ("no-sharing", unique)):
                key = f"{name} caching={'on' if caching else 'off'}"
                runs[key] = run_offline(llm.engine, requests, ignore_eos=True, request_prefix=key)
                print_offline(key, runs[key])
                save()
    return report


def engine_decode(engine, args, decode_rows: dict, vocab: int) -> list[dict]:
    """Decode step time of the whole engine (scheduling, inputs, dispatch, sampling, host
    bookkeeping; async scheduling as configured) at ctx `args.context`: `batch` requests are
    prefilled, then `args.engine_decode_steps` pure-decode steps are timed. The prompts are
    shorter than `args.context` by the tokens decoded before the middle of the timed steps, so
    the timed steps' mean context is `args.context`; the floor is taken at the mean context
    measured (`decode_rows`' floor at `args.context`, its KV bytes scaled)."""
    import numpy as np

    from jaxpaged.sampling_params import SamplingParams

    rng = np.random.default_rng(4)
    rows = []
    for batch in args.batches:
        if batch > engine.config.max_num_seqs:
            continue
        steps = args.engine_decode_steps
        # Prefill takes several steps and the first requests start decoding while later ones
        # are still prefilling: leave every request room for all of them, the two untimed steps,
        # the timed ones and the one async scheduling dispatches ahead, so the batch stays whole
        # (checked below), then abort.
        prefill_steps = -(-batch * args.context // engine.config.max_num_batched_tokens)
        max_tokens = min(prefill_steps + steps + args.engine_profile_steps + 8,
                         engine.max_model_len - args.context)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        # Requests prefilled first decode during the later prefill steps: ~half of them each.
        prompt_len = max(1, args.context - (prefill_steps // 2 + 2 + steps // 2))
        ids = [f"decode-{batch}-{i}" for i in range(batch)]
        for request_id in ids:
            engine.add_request(request_id, rng.integers(100, vocab, prompt_len).tolist(), params)
        started = set()
        while len(started) < batch:  # prefill until every request has its first token
            started.update(o.request_id for o in engine.step())
        for _ in range(2):
            engine.step()
        sizes, contexts = [], [mean_context(engine)]
        with HostTimes(engine.runner) as host:
            begin = time.perf_counter()
            for _ in range(steps):
                sizes.append(len(engine.step()))
            step_s = (time.perf_counter() - begin) / steps
        contexts.append(mean_context(engine))
        context = sum(contexts) / 2
        device = profile_engine_steps(engine, args.engine_profile_steps, sizes, args.out_dir)
        if min(sizes) != batch:
            raise RuntimeError(f"engine decode batch {batch}: steps returned {min(sizes)}..{max(sizes)} "
                               "outputs, the batch did not stay whole")
        for request_id in ids:
            engine.abort(request_id)
        while engine.has_unfinished:  # the last dispatched step (async scheduling)
            engine.step()
        floor = floor_at(decode_rows.get(batch), context)
        rows.append({"batch": batch, "context": context, "prompt_len": prompt_len, "steps": steps,
                     "step_ms": 1e3 * step_s, "floor_ms": floor,
                     "ratio_to_floor": 1e3 * step_s / floor if floor else None,
                     "async_scheduling": engine.async_scheduling,
                     "host_ms_per_step": host.per_step(steps), "device_profile": device})
        print(f"engine decode batch {batch:4d} mean ctx {context:.0f}: {1e3 * step_s:.2f} ms/step"
              + (f" = {rows[-1]['ratio_to_floor']:.2f}x the floor" if floor else "")
              + "; host " + ", ".join(f"{k} {v:.2f}" for k, v in host.per_step(steps).items())
              + (f"; device busy {device['busy_ms']:.2f}, idle {device['idle_ms']:.2f} ms/step"
                 if device.get("kernels_per_step") else ""), flush=True)
    return rows


def mean_context(engine) -> float:
    """Mean tokens in the cache (or being computed) over the engine's running requests."""
    running = engine.scheduler.running
    return sum(r.num_computed_tokens for r in running) / max(len(running), 1)


def floor_at(row: dict | None, context: float) -> float | None:
    """A decode row's floor (ms) with its KV bytes scaled from the row's context to `context`."""
    if not row:
        return None
    kv_bytes = row["kv_bytes"] * context / row["context"]
    return row["floor_ms"] * (row["weight_bytes"] + kv_bytes) / (row["weight_bytes"] + row["kv_bytes"])


class HostTimes:
    """Wall time the engine spends in `runner.dispatch` (packing the inputs, copying them and
    launching the programs) and in `runner.fetch` (waiting for the device), per step; the rest of
    a step is the host's scheduling and bookkeeping. While the fetch wait stays above zero the
    device sets the pace."""

    def __init__(self, runner):
        self.runner, self.seconds = runner, {"dispatch": 0.0, "fetch_wait": 0.0}

    def _timed(self, name, method):
        def call(*a, **k):
            begin = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - begin
        return call

    def __enter__(self):
        self.runner.dispatch = self._timed("dispatch", self.runner.dispatch)
        self.runner.fetch = self._timed("fetch_wait", self.runner.fetch)
        return self

    def __exit__(self, *exc):
        del self.runner.dispatch, self.runner.fetch  # the class's methods again

    def per_step(self, steps: int) -> dict:
        return {f"{k}_ms": 1e3 * v / steps for k, v in self.seconds.items()}


def profile_engine_steps(engine, steps: int, sizes: list, out_dir: str) -> dict:
    """`steps` more engine steps under the JAX profiler: the device's span, busy and idle time
    per step as the engine drives it (decode_profile.py's summary of the GPU kernel events)."""
    if not steps:
        return {}
    import tempfile

    import jax

    from decode_profile import gpu_kernel_events, summarize

    with tempfile.TemporaryDirectory(dir=out_dir) as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                sizes.append(len(engine.step()))
        events, _ = gpu_kernel_events(Path(trace_dir))
    summary = summarize(events, steps, 0)
    for key in ("top_kernels", "layer_kernels", "matmul_weight_bandwidth_tb_s"):
        summary.pop(key, None)
    return summary


def mixed_step_breakdown(args, params, config, dtype, matmul_flop_s: float) -> dict:
    """Where an offline step's time goes: the steady state of the offline run (every decode slot
    busy at ctx ~input + output/2, the rest of the token budget prefill chunks of new prompts),
    timed as the whole forward, the forward with attention replaced by a pass-through (matmuls,
    norms, rope, LM head), and the attention op alone x layers. Matmul FLOPs over the
    pass-through time give its achieved rate against the measured matmul rate."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpaged.attention import get_kv_cache_shape, make_attention
    from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size
    from jaxpaged.runner import _forward_step, pick_fp8_ops

    page_size, budget = default_page_size(), args.max_num_batched_tokens
    decode_seqs = min(args.max_num_seqs, budget // 2)
    context = args.input_len + args.output_len // 2
    chunks = []
    left = budget - decode_seqs
    while left > 0:
        chunks.append(min(args.input_len, left))
        left -= chunks[-1]
    inputs, _ = decode_batch_inputs(decode_seqs, context, config.vocab_size, page_size, budget,
                                    prefill_chunks=tuple(chunks))
    num_seqs = decode_seqs + len(chunks)
    next_page = int(np.max(inputs.attention.page_indices)) + 1
    kv_shape = get_kv_cache_shape(next_page, page_size, config.num_kv_heads, config.head_dim)
    kv_pages = [jax.random.normal(key, kv_shape, dtype)
                for key in jax.random.split(jax.random.key(2), config.num_layers)]
    platform = jax.devices()[0].platform
    attention = make_attention(args.attention_backend, platform=platform,
                               sm_scale=config.head_dim ** -0.5, sliding_window=None)
    last = jnp.zeros(num_seqs, jnp.int32)
    repeats = 3 if args.smoke else 10
    row = {"decode_seqs": decode_seqs, "decode_context": context, "prefill_chunks": chunks,
           "tokens": budget}

    def timed(layer_attention) -> float:
        step = jax.jit(functools.partial(_forward_step, config=config, attention=layer_attention,
                                         fp8_ops=pick_fp8_ops(platform, config, 1)),
                       donate_argnums=(1,))
        state = {"kv": kv_pages}

        def run():
            logits, _, state["kv"] = step(params, state["kv"], inputs.token_ids, inputs.token_src,
                                          last, inputs.attention)
            logits.block_until_ready()

        seconds = median_seconds(run, repeats)
        kv_pages[:] = state["kv"]
        return seconds

    row["forward_ms"] = 1e3 * timed(attention)
    row["forward_without_attention_ms"] = 1e3 * timed(lambda q, k, v, kv, metadata, rope=None, counts=None: (q, kv, counts))
    q = jax.random.normal(jax.random.key(3), (budget, config.num_q_heads, config.head_dim), dtype)
    k = jax.random.normal(jax.random.key(4), (budget, config.num_kv_heads, config.head_dim), dtype)
    one_layer = jax.jit(attention, donate_argnums=(3,))
    state = {"kv": kv_pages[0]}

    def run_attention():
        out, state["kv"], _ = one_layer(q, k, k, state["kv"], inputs.attention)
        out.block_until_ready()

    row["attention_ms"] = 1e3 * config.num_layers * median_seconds(run_attention, repeats)
    # Every token goes through the layers' weights; only each sequence's last row through the head.
    weights = (sum(x.size for x in jax.tree.leaves(params)) - params["embed"].size
               - (params["lm_head"].size if "lm_head" in params else 0))
    head = 2 * num_seqs * config.vocab_size * config.hidden_size
    row["matmul_flop"] = 2 * budget * weights + head
    seconds = row["forward_without_attention_ms"] / 1e3
    row["achieved_matmul_flop_s"] = row["matmul_flop"] / seconds
    row["fraction_of_matmul_rate"] = row["achieved_matmul_flop_s"] / matmul_flop_s
    print(f"mixed step ({decode_seqs} decode at ctx {context} + prefill {chunks}): forward "
          f"{row['forward_ms']:.1f} ms, without attention {row['forward_without_attention_ms']:.1f} ms "
          f"({row['achieved_matmul_flop_s'] / 1e12:.0f} TFLOP/s = {row['fraction_of_matmul_rate']:.0%} "
          f"of the matmul rate), attention alone x{config.num_layers} {row['attention_ms']:.1f} ms",
          flush=True)
    return row


def print_offline(name: str, r: dict) -> None:
    print(f"{name}: {r['output_throughput']:.0f} out tok/s, {r['total_token_throughput']:.0f} total "
          f"tok/s, {r['request_throughput']:.2f} req/s | TTFT mean {r['mean_ttft_ms']:.0f} ms | "
          f"step {r['mean_step_ms']:.1f} ms = execute {r['mean_execute_ms']:.1f} + host "
          f"{r['mean_host_ms']:.1f} | peak KV {r['peak_kv_usage']:.0%} | hit rate "
          f"{r['prefix_cache_hit_rate']:.0%} | {r['compiles_during_run']} compiles", flush=True)


# ---- orchestration ---------------------------------------------------------------------------

def run_startup(args, out: Path, env: dict) -> None:
    """Process start to ready engine, empty then warm compilation cache (`jaxpaged bench startup`)."""
    import tempfile

    from jaxpaged.bench.startup import measure

    os.environ.update(env)
    kwargs = {"model": args.model, **engine_kwargs(args)}
    if kwargs["token_buckets"]:
        kwargs["token_buckets"] = list(kwargs["token_buckets"])
    with tempfile.TemporaryDirectory(prefix="jaxpaged-xla-") as cache_dir:
        result = {"engine_args": kwargs}
        for name in ("cold", "warm"):
            result[name] = measure(dict(kwargs), cache_dir)
            print(f"startup {name}: {result[name]['seconds_to_ready']:.1f} s to ready, "
                  f"{result[name]['persistent_cache_hits']} programs from the cache", flush=True)
            (out / "startup.json").write_text(json.dumps(result, indent=2))


def run_part(part: str, argv: list[str], env: dict) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, *argv]
    result = subprocess.run(command, env=env)
    if result.returncode:
        print(f"part {part} exited with {result.returncode}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "hf":
        (out / "hf.json").write_text(json.dumps(run_hf(args), indent=2))
        return 0
    if args.part == "jax":
        run_jax(args)
        return 0
    if args.summarize_only:
        summary = summarize(out, args, argv, 0.0)
        (out / "h100_llama8b.json").write_text(json.dumps(summary, indent=2))
        (out / "h100_llama8b.md").write_text(render_markdown(summary))
        return 0
    env = dict(os.environ)
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    else:  # the engine sizes its KV cache from what JAX may take: let it take most of the card
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    start = time.time()
    if not args.skip_hf:
        run_part("hf", argv, env)
    run_part("jax", argv, env)
    if args.startup and (args.deadline is None or time.time() < args.deadline):
        run_startup(args, out, env)
    summary = summarize(out, args, argv, time.time() - start)
    (out / "h100_llama8b.json").write_text(json.dumps(summary, indent=2))
    (out / "h100_llama8b.md").write_text(render_markdown(summary))
    print(render_markdown(summary))
    return 0


def summarize(out: Path, args, argv: list[str], seconds: float) -> dict:
    def load(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    summary = {"command": "python3 benchmarks/h100_llama8b.py " + " ".join(argv),
               "wall_seconds": seconds, "args": vars(args), "hf": load("hf"), "jax": load("jax"),
               "startup": load("startup")}
    jax_part, hf = summary["jax"] or {}, summary["hf"]
    offline = jax_part.get("offline")
    if offline:
        summary["output_tok_s"] = offline["output_throughput"]
        summary["target_output_tok_s"] = 5800
        if hf:
            summary["speedup_vs_transformers"] = offline["output_throughput"] / hf["output_throughput"]
    return summary


def render_markdown(s: dict) -> str:
    j, hf = s.get("jax") or {}, s.get("hf")
    weights = "bf16" if not j.get("quantization") else f"{j['quantization']} linear weights (bf16 otherwise)"
    if j.get("kv_cache_dtype", "auto") != "auto":
        weights += f", {j['kv_cache_dtype']} KV cache"
    lines = [f"# Llama-3.1-8B-shaped, {weights}, random weights: {j.get('device', '?')}", "",
             "Command:", "", f"    {s['command']}", "",
             f"jax {j.get('jax', '?')}, attention backend `{j.get('attention_backend', '?')}`; "
             f"whole run {s['wall_seconds']:.0f} s.", ""]
    if "roofline" in j:
        r = j["roofline"]
        kinds = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in r.get("copy_kinds_bytes_s", {}).items())
        lines += [f"Measured: copy bandwidth {r['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s "
                  f"(read + write of {r['copy_bytes'] / 2**30:.2f} GiB, the fastest of: {kinds}), "
                  f"bf16 matmul {r['matmul_flop_s'] / 1e12:.0f} TFLOP/s ({r['matmul_n']}^3)"
                  + (f"; held for seconds, {r['sustained_matmul_flop_s'] / 1e12:.0f} TFLOP/s"
                     if r.get("sustained_matmul_flop_s") else "") + ".", ""]
    if j.get("decode"):
        lines += [f"## Decode step at ctx {s['args']['context']} vs the floor", "",
                  "One step at a time (`runner.execute`, which waits for each step's sampled ids "
                  "before the next is dispatched), split into its programs:", "",
                  "| batch | step | forward | sampler | rest | floor | step/floor |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in j["decode"]:
            if "error" in row:
                lines.append(f"| {row['batch']} | {row['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {row['batch']} | {row['step_ms']:.2f} ms | {row['forward_ms']:.2f} ms | "
                         f"{row['sample_ms']:.2f} ms | {row['other_ms']:.2f} ms | "
                         f"{row['floor_ms']:.2f} ms | {row['ratio_to_floor']:.2f}x |")
        lines.append("")
    if j.get("engine_decode"):
        targets = {1: 1.15, 256: 1.3}
        lines += ["Through the whole engine, as it serves (scheduling, inputs, dispatch, sampling, "
                  "host bookkeeping; async scheduling "
                  f"{'on' if j['engine_decode'][0]['async_scheduling'] else 'off'}), "
                  "pure-decode steps after prefill, centred on the context above; the targets "
                  "apply here:", "",
                  "| batch | mean ctx | engine step | floor at that ctx | step/floor | target |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in j["engine_decode"]:
            ratio = f"{row['ratio_to_floor']:.2f}x" if row.get("ratio_to_floor") else "-"
            floor = f"{row['floor_ms']:.2f} ms" if row.get("floor_ms") else "-"
            target = targets.get(row["batch"])
            lines.append(f"| {row['batch']} | {row['context']:.0f} | {row['step_ms']:.2f} ms | "
                         f"{floor} | {ratio} | {f'<= {target}x' if target else '-'} |")
        lines.append("")
    m = j.get("mixed_step")
    if m:
        lines += ["## One offline-like mixed step, taken apart", "",
                  f"{m['decode_seqs']} decode rows at ctx {m['decode_context']} plus prefill chunks "
                  f"{m['prefill_chunks']} ({m['tokens']} tokens):", "",
                  "| forward | forward, attention a pass-through | attention op alone x layers | "
                  "matmul rate reached (pass-through) |", "| --- | --- | --- | --- |",
                  f"| {m['forward_ms']:.1f} ms | {m['forward_without_attention_ms']:.1f} ms | "
                  f"{m['attention_ms']:.1f} ms | {m['achieved_matmul_flop_s'] / 1e12:.0f} TFLOP/s = "
                  f"{m['fraction_of_matmul_rate']:.0%} of the measured rate |", ""]
    if j.get("offline"):
        o, e = j["offline"], j.get("engine", {})
        w = s["args"]
        lines += [f"## Offline throughput, random {w['input_len']} in / {w['output_len']} out", "",
                  f"{o['completed']} prompts, EOS ignored; engine: max_num_seqs {e.get('max_num_seqs')}, "
                  f"max_num_batched_tokens {e.get('max_num_batched_tokens')}, buckets "
                  f"{e.get('token_buckets')}, {e.get('num_pages')} pages of {e.get('page_size')}; "
                  f"ready in {e.get('setup_seconds', 0):.0f} s ({e.get('warmup_programs')} programs).", "",
                  "| engine | output tok/s | total tok/s | req/s | prompts |", "| --- | --- | --- | --- | --- |",
                  f"| jaxpaged | {o['output_throughput']:.0f} | {o['total_token_throughput']:.0f} | "
                  f"{o['request_throughput']:.2f} | {o['completed']} |"]
        if hf:
            lines.append(f"| transformers generate (static batches of {hf['batch']}) | "
                         f"{hf['output_throughput']:.0f} | - | {hf['request_throughput']:.2f} | "
                         f"{hf['num_prompts']} (subsample) |")
        if o.get("truncated"):
            lines += ["", f"Stopped at the --offline-seconds limit: {o['completed']} of "
                      f"{w['num_prompts']} prompts finished; counting every token produced, "
                      f"{o['produced_output_throughput']:.0f} output tok/s."]
        sync = j.get("offline_sync")
        if sync:
            lines += ["", f"Same engine and workload with async scheduling off: "
                      f"{sync['output_throughput']:.0f} output tok/s (step {sync['mean_step_ms']:.1f} ms "
                      f"= execute {sync['mean_execute_ms']:.1f} + host {sync['mean_host_ms']:.1f}; "
                      f"{sync['num_steps']} steps)."]
        lines += ["", f"Target >= 5800 output tok/s: {o['output_throughput'] / 5800:.2f}x of it."]
        floor = j.get("offline_floor")
        if floor and not o.get("truncated"):
            output = o["total_output_tokens"]
            lines += ["", "The workload's floor at this run's measured rates (`roofline.offline_floor`): "
                      f"matmuls and attention {(floor['matmul_flops'] + floor['attention_flops']) / 1e15:.1f} "
                      f"PFLOP = {floor['matmul_seconds']:.1f} s, the decodes' KV reads "
                      f"{floor['kv_read_bytes'] / 1e12:.1f} TB = {floor['kv_read_seconds']:.1f} s; together "
                      f"{floor['seconds']:.1f} s = {floor['output_tok_s']:.0f} output tok/s. This run took "
                      f"{o['duration_s']:.1f} s ({floor['seconds'] / o['duration_s']:.2f}x the floor's speed); "
                      f"5800 output tok/s needs {output / 5800:.1f} s."]
        held = j.get("offline_floor_sustained")
        if held and not o.get("truncated"):
            lines += ["", f"At the matmul rate the card holds for seconds "
                      f"({j['roofline']['sustained_matmul_flop_s'] / 1e12:.0f} TFLOP/s), the matmuls and "
                      f"attention alone take {held['matmul_seconds']:.1f} s and the floor is "
                      f"{held['seconds']:.1f} s = {held['output_tok_s']:.0f} output tok/s (this run: "
                      f"{held['seconds'] / o['duration_s']:.2f}x the floor's speed)."]
        clocks = j.get("offline_gpu_clocks")
        if clocks:
            lines += ["", f"During the run (nvidia-smi, {clocks['samples']} samples): SM clock "
                      f"{clocks['sm_mhz']:.0f} of {clocks['max_sm_mhz']:.0f} MHz, power {clocks['power_w']:.0f} "
                      f"of {clocks['power_limit_w']:.0f} W, held by the power cap in "
                      f"{clocks['power_capped_fraction']:.0%} of the samples."]
        if s.get("speedup_vs_transformers"):
            lines.append(f"jaxpaged / transformers: {s['speedup_vs_transformers']:.2f}x.")
        lines += ["", f"Per engine step ({o['num_steps']} steps): {o['mean_step_ms']:.1f} ms = "
                  f"execute (device + dispatch) {o['mean_execute_ms']:.1f} ms + host "
                  f"{o['mean_host_ms']:.1f} ms. TTFT mean {o['mean_ttft_ms']:.0f} ms, TPOT mean "
                  f"{o['mean_tpot_ms']:.1f} ms. Peak KV usage {o['peak_kv_usage']:.0%}. "
                  f"Compiles during the run: {o['compiles_during_run']}.", ""]
    if s.get("startup"):
        st = s["startup"]
        lines += ["## Start-up (process start to ready engine)", "",
                  "| cache | seconds | warm-up | programs | from the persistent cache |",
                  "| --- | --- | --- | --- | --- |"]
        for name in ("cold", "warm"):
            if name in st:
                r = st[name]
                lines.append(f"| {name} | {r['seconds_to_ready']:.1f} | {r['warmup_seconds']:.1f} | "
                             f"{r['programs']} | {r['persistent_cache_hits']} |")
        lines.append("")
    if j.get("prefix_cache"):
        lines += ["## Prefix caching (issue 7)", "",
                  "| workload | caching | output tok/s | total tok/s | mean TTFT | hit rate |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, r in j["prefix_cache"].items():
            name, caching = key.split(" caching=")
            lines.append(f"| {name} | {caching} | {r['output_throughput']:.0f} | "
                         f"{r['total_token_throughput']:.0f} | {r['mean_ttft_ms']:.0f} ms | "
                         f"{r['prefix_cache_hit_rate']:.0%} |")
        runs = j["prefix_cache"]
        pairs = [("shared-prefix", "target >= 2x"), ("no-sharing", "target: < 2% slower")]
        for name, target in pairs:
            on, off = runs.get(f"{name} caching=on"), runs.get(f"{name} caching=off")
            if on and off:
                lines.append(f"\n{name}: caching on / off total throughput "
                             f"{on['total_token_throughput'] / off['total_token_throughput']:.2f}x "
                             f"({target}).")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
