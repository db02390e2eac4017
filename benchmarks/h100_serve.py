"""Issue 6's serving targets on one H100: `jaxpaged serve`, Llama-3.1-8B-shaped, random bf16 weights.

One process tree, one device call (~8 minutes at the defaults), results in --out-dir:

1. `jaxpaged serve --model llama-3.1-8b --load-format dummy` with serving flags (below) in a
   child process (its log: `server.log`); wait for /health (the engine compiles every token
   bucket first: ~60 s cold on the H100).
2. Warm-up: a few requests of assorted prompt lengths, so each program's first execution is not
   measured. /metrics gives the programs compiled at start-up and the compiles since (`jaxpaged:
   warmup_programs`, `jaxpaged:compiles_after_warmup`; serving should compile nothing).
3. `sharegpt-like` (token-id prompts, lengths as ShareGPT's, EOS ignored), --num-prompts requests
   over --concurrency streams: median TPOT and TTFT against the targets (<= 7.5 ms, <= 60 ms).
4. A Poisson request-rate sweep, same dataset: each --rates level sends rate x --rate-seconds
   requests (within [--rate-min-requests, --rate-max-requests]); the sweep stops past saturation
   (a level that hit its --level-seconds limit, finished under half its offered rate, or whose
   throughput grew < 1.2x over the previous level's; throughput counts the drain after the last
   arrival, so even an unsaturated level shows somewhat less than offered) and ends with every
   request at once (`inf`: the saturated throughput).
5. SIGTERM the server and check it exits cleanly; write `h100_serve.json` and `h100_serve.md`.
6. Start-up, warm: launch the server again on the compilation cache the first one filled (the
   first start used an empty one: cold) and time it to /health, then stop it (skip:
   --no-warm-restart).

Requests unfinished at a time limit are cancelled and counted as failed, so a truncated level's
latencies describe the requests that finished (the shorter ones). `--deadline` (epoch seconds)
shortens or skips the later phases so the whole run ends before it.

    python3 benchmarks/h100_serve.py --out-dir $OUT --deadline $(( $(date +%s) + 530 ))  # H100
    python3 benchmarks/h100_serve.py --smoke --out-dir /tmp/serve                          # CPU
"""

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpaged.bench.datasets import random_requests, sharegpt_like_requests  # noqa: E402
from jaxpaged.bench.serve import (launch_server, read_metrics, run_benchmark,  # noqa: E402
                                  served_model, stop_server)

TARGETS = {"median_tpot_ms": 7.5, "median_ttft_ms": 60.0}
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
SHUTDOWN_RESERVE_S = 25  # kept back from --deadline to stop the server and write the results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt token ids below it (default: the model's vocabulary)")
    engine = parser.add_argument_group("engine (jaxpaged serve flags)")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--quantization", default=None, help="fp8: FP8 linear weights")
    engine.add_argument("--kv-cache-dtype", default="auto",
                        help="auto: the model dtype; fp8: one byte per cached value")
    engine.add_argument("--max-model-len", type=int, default=2048)
    engine.add_argument("--max-num-seqs", type=int, default=128)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048)
    engine.add_argument("--token-buckets", type=int, nargs="+", default=None,
                        help="default: the engine's (powers of two from 8 up to the token budget)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    engine.add_argument("--attention-backend", default="auto")
    engine.add_argument("--server-timeout", type=float, default=360, help="seconds to /health")
    work = parser.add_argument_group("workload")
    work.add_argument("--max-input-len", type=int, default=1024)
    work.add_argument("--max-output-len", type=int, default=1024)
    work.add_argument("--concurrency", type=int, default=4)
    work.add_argument("--num-prompts", type=int, default=80)
    work.add_argument("--concurrency-seconds", type=float, default=150, help="time limit of phase 3")
    work.add_argument("--rates", type=float, nargs="*", default=[2, 4, 8, 16, 32])
    work.add_argument("--rate-seconds", type=float, default=20, help="arrival span of a level")
    work.add_argument("--rate-min-requests", type=int, default=24)
    work.add_argument("--rate-max-requests", type=int, default=300)
    work.add_argument("--level-seconds", type=float, default=50, help="time limit of a level")
    work.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds since the epoch by which the run must be done")
    parser.add_argument("--no-warm-restart", dest="warm_restart", action="store_false",
                        help="skip phase 6 (the second, warm start)")
    parser.add_argument("--smoke", action="store_true", help="tiny dummy model on CPU (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        tiny = Path(args.out_dir) / "tiny-llama"
        tiny.mkdir(parents=True, exist_ok=True)
        (tiny / "config.json").write_text(json.dumps(TINY_CONFIG))
        args.model, args.dtype = str(tiny), "float32"
        args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens = 128, 8, 64
        args.token_buckets, args.max_input_len, args.max_output_len = [16, 64], 48, 12
        args.num_prompts, args.rates, args.rate_seconds = 8, [20, 80], 0.3
        args.rate_min_requests, args.rate_max_requests = 4, 16
        args.concurrency_seconds, args.level_seconds, args.server_timeout = 60, 30, 300
    if args.vocab_size is None:
        from jaxpaged.model_source import resolve_model

        args.vocab_size = resolve_model(args.model, args.load_format).model_config().vocab_size
    return args


def serve_args(args) -> list[str]:
    return ["--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype,
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            *(["--token-buckets", *map(str, args.token_buckets)] if args.token_buckets else []),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--attention-backend", args.attention_backend, "--kv-cache-dtype", args.kv_cache_dtype,
            *(["--quantization", args.quantization] if args.quantization else [])]


def server_env(args, compile_cache: str) -> dict:
    # The log gets the warm-up lines. The first start compiles into an empty cache (cold).
    env = {**os.environ, "JAXPAGED_LOG_LEVEL": "INFO", "JAXPAGED_COMPILE_CACHE": compile_cache}
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    else:  # the engine sizes its KV cache from what JAX may take: let it take most of the card
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    return env


def compile_counts(url: str) -> dict:
    values = asyncio.run(_metrics(url))
    counts = {key: values.get(f"jaxpaged:{key}") for key in ("warmup_programs", "compiles_after_warmup")}
    return {key: int(v) if v is not None and math.isfinite(v) else v for key, v in counts.items()}


async def _metrics(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        return await read_metrics(client, url)


def workload(args, num_prompts: int, seed: int):
    return sharegpt_like_requests(num_prompts, args.vocab_size, seed, max_input_len=args.max_input_len,
                                  max_output_len=args.max_output_len)


def time_left(args) -> float:
    return math.inf if args.deadline is None else args.deadline - time.time() - SHUTDOWN_RESERVE_S


def run_level(args, url: str, model: str, label: str, requests, *, rate=math.inf,
              concurrency=None, limit: float) -> dict:
    row = asyncio.run(run_benchmark(url, model, requests, request_rate=rate,
                                    max_concurrency=concurrency, ignore_eos=True, seed=args.seed,
                                    max_seconds=limit))
    row["label"], row["num_requests"], row["time_limit_s"] = label, len(requests), limit
    print(format_row(row), flush=True)
    return row


def format_row(r: dict) -> str:
    def ms(key):
        return f"{r[key]:8.1f}" if r.get(key) is not None else f"{'-':>8}"

    return (f"{r['label']:>10} | {r['completed']:4d}/{r['num_requests']:<4d} {r['request_throughput']:6.2f} "
            f"req/s {r['output_throughput']:8.0f} out tok/s | TTFT p50 {ms('median_ttft_ms')} p99 "
            f"{ms('p99_ttft_ms')} | TPOT p50 {ms('median_tpot_ms')} p99 {ms('p99_tpot_ms')} | "
            f"ITL p99 {ms('p99_itl_ms')} ms{' | TRUNCATED' if r.get('truncated') else ''}")


def sweep(args, url: str, model: str, report: dict, save) -> None:
    rows = report["rate_sweep"] = []
    levels = [*args.rates, math.inf]
    i = 0
    while i < len(levels):
        rate, limit = levels[i], min(args.level_seconds, time_left(args))
        if limit < 10:
            report["notes"].append(f"rate sweep stopped before rate {rate}: --deadline")
            return
        n = args.rate_max_requests
        if math.isfinite(rate):
            n = int(min(n, max(args.rate_min_requests, rate * args.rate_seconds)))
        rows.append(run_level(args, url, model, f"rate {rate:g}", workload(args, n, args.seed + 1 + i),
                              rate=rate, limit=limit))
        save()
        row, previous = rows[-1], rows[-2] if len(rows) > 1 else None
        grew = previous is None or row["request_throughput"] >= 1.2 * previous["request_throughput"]
        kept_up = row["request_throughput"] >= 0.5 * rate
        if math.isfinite(rate) and (row.get("truncated") or not grew or not kept_up):
            report["saturated_at_rate"] = rate
            if levels[i + 1:-1]:
                report["notes"].append(f"past saturation at {rate:g} req/s: skipped rates "
                                       f"{levels[i + 1:-1]}")
            levels = [*levels[:i + 1], math.inf]
        i += 1


def device_name() -> str:
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    return "cpu"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    report = {"command": "python3 benchmarks/h100_serve.py " + " ".join(argv), "args": vars(args),
              "device": "cpu" if args.smoke else device_name(), "serve_args": serve_args(args),
              "targets": TARGETS, "notes": []}

    def save():
        report["wall_seconds"] = time.time() - start
        (out / "h100_serve.json").write_text(json.dumps(report, indent=2))

    process = None
    compile_cache = tempfile.mkdtemp(prefix="jaxpaged-serve-xla-")
    try:
        ready = time.perf_counter()
        timeout = min(args.server_timeout, max(time_left(args), 30))
        process, url = launch_server(serve_args(args), timeout, env=server_env(args, compile_cache),
                                     log_path=str(out / "server.log"))
        report["seconds_to_ready"] = time.perf_counter() - ready
        report["compiles_at_ready"] = compile_counts(url)
        print(f"server ready in {report['seconds_to_ready']:.0f} s: {report['compiles_at_ready']}",
              flush=True)
        model = served_model(url, None)
        warm = random_requests(8, args.max_input_len // 2, 8, 0.95, args.vocab_size, seed=99)
        report["warmup"] = run_level(args, url, model, "warm-up", warm, concurrency=8,
                                     limit=max(10.0, min(120.0, time_left(args))))
        report["compiles_after_warmup"] = compile_counts(url)
        save()
        limit = min(args.concurrency_seconds, time_left(args))
        if limit >= 10:
            report["concurrency"] = run_level(
                args, url, model, f"c={args.concurrency}", workload(args, args.num_prompts, args.seed),
                concurrency=args.concurrency, limit=limit)
            save()
        else:
            report["notes"].append(f"ShareGPT-like at {args.concurrency} streams skipped: --deadline")
        sweep(args, url, model, report, save)
        report["compiles_after_run"] = compile_counts(url)
    except (Exception, KeyboardInterrupt, SystemExit) as error:  # stop the server, save, report
        report["error"] = f"{type(error).__name__}: {error}"[:2000]
        print(f"error: {report['error']}", flush=True)
    finally:
        if process is not None:
            stopping = time.perf_counter()
            code = report["server_exit_code"] = stop_server(process, timeout=30)
            report["shutdown_seconds"] = time.perf_counter() - stopping
            log = (out / "server.log").read_text(errors="replace")
            # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done
            report["server_clean_exit"] = code in (0, -signal.SIGTERM) and "Traceback" not in log
            warmup = re.search(r"warm-up compiled (\d+) programs in ([\d.]+) s", log)
            if warmup:
                report["engine_warmup_seconds"] = float(warmup.group(2))
            report["warmup_breakdown"] = warmup_breakdown(log)
    if args.warm_restart and "error" not in report:
        warm_restart(args, report, compile_cache, out)
    shutil.rmtree(compile_cache, ignore_errors=True)
    save()
    markdown = render_markdown(report)
    (out / "h100_serve.md").write_text(markdown)
    print(markdown)
    return 1 if "error" in report else 0


def warmup_breakdown(log: str) -> str | None:
    found = re.search(r"warm-up: lowering .*", log)
    return found.group(0) if found else None


def warm_restart(args, report: dict, compile_cache: str, out: Path) -> None:
    """Phase 6: the same server again on the filled compilation cache, to /health, then stop."""
    limit = min(args.server_timeout, time_left(args) + SHUTDOWN_RESERVE_S - 10)
    if limit < 30:
        report["notes"].append("warm restart skipped: --deadline")
        return
    warm = report["warm_start"] = {}
    process = None
    try:
        ready = time.perf_counter()
        process, url = launch_server(serve_args(args), limit, env=server_env(args, compile_cache),
                                     log_path=str(out / "server_warm.log"))
        warm["seconds_to_ready"] = time.perf_counter() - ready
        warm["compiles_at_ready"] = compile_counts(url)
        print(f"warm restart: ready in {warm['seconds_to_ready']:.0f} s", flush=True)
    except Exception as error:  # noqa: BLE001 - reported, the first run's results stand
        warm["error"] = f"{type(error).__name__}: {error}"[:1000]
    finally:
        if process is not None:
            warm["server_exit_code"] = stop_server(process, timeout=30)
            log = (out / "server_warm.log").read_text(errors="replace")
            found = re.search(r"warm-up compiled (\d+) programs in ([\d.]+) s", log)
            if found:
                warm["engine_warmup_seconds"] = float(found.group(2))
            warm["warmup_breakdown"] = warmup_breakdown(log)


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    if value <= target:
        return f"met ({target - value:.1f} ms to spare)"
    return f"missed by {value - target:.1f} ms ({value / target:.2f}x the target)"


def render_markdown(r: dict) -> str:
    a = r["args"]
    lines = [f"# Serving `{a['model']}` ({a['load_format']} weights): {r['device']}", "",
             "Command:", "", f"    {r['command']}", "",
             f"Server: `jaxpaged serve {' '.join(r['serve_args'])}`; whole run "
             f"{r.get('wall_seconds', 0):.0f} s.", ""]
    if "error" in r:
        lines += [f"**The run failed:** `{r['error'][:500]}` (see server.log).", ""]
    if "seconds_to_ready" in r:
        warmup = r.get("engine_warmup_seconds")
        lines.append(f"Ready (/health) {r['seconds_to_ready']:.0f} s after launch"
                     f"{f' (of which compiling: {warmup:.0f} s)' if warmup is not None else ''}.")
    if r.get("warmup_breakdown"):
        lines.append(f"Cold start's {r['warmup_breakdown']}.")
    warm = r.get("warm_start")
    if warm:
        if "seconds_to_ready" in warm:
            compiling = warm.get("engine_warmup_seconds")
            lines.append(f"Warm start (the same server again, on the compilation cache the first "
                         f"filled): ready {warm['seconds_to_ready']:.0f} s after launch"
                         f"{f' (warm-up {compiling:.0f} s)' if compiling is not None else ''}.")
        else:
            lines.append(f"Warm start failed: `{warm.get('error')}`.")
    counts = r.get("compiles_after_run") or r.get("compiles_after_warmup")
    if counts:
        lines.append(f"Programs compiled at start-up: {counts['warmup_programs']}; XLA compiles "
                     f"after warm-up (by the end of the run): {counts['compiles_after_warmup']}.")
    lines.append("")
    c = r.get("concurrency")
    if c:
        lines += [f"## ShareGPT-like, {a['concurrency']} concurrent streams", "",
                  f"{c['num_requests']} requests (prompts <= {a['max_input_len']}, outputs <= "
                  f"{a['max_output_len']} tokens, EOS ignored), {c['completed']} completed, "
                  f"{c['failed']} failed, {c['duration_s']:.1f} s; {c['output_throughput']:.0f} "
                  f"output tok/s.", "", "| metric | measured | target | verdict |",
                  "| --- | --- | --- | --- |"]
        for key, name in (("median_tpot_ms", "median TPOT"), ("median_ttft_ms", "median TTFT")):
            value = c.get(key)
            shown = f"{value:.2f} ms" if value is not None else "-"
            lines.append(f"| {name} | {shown} | <= {TARGETS[key]} ms | {verdict(value, TARGETS[key])} |")
        lines += ["", f"p99 TPOT {_ms(c, 'p99_tpot_ms')}, p99 TTFT {_ms(c, 'p99_ttft_ms')}, median "
                  f"ITL {_ms(c, 'median_itl_ms')}, p99 ITL {_ms(c, 'p99_itl_ms')}.", ""]
    if r.get("rate_sweep"):
        lines += ["## Request-rate sweep (Poisson arrivals, ShareGPT-like)", "",
                  "| offered req/s | done/sent | req/s | output tok/s | TTFT p50 | TTFT p99 | "
                  "TPOT p50 | TPOT p99 | peak KV | truncated |", "| --- " * 10 + "|"]
        for row in r["rate_sweep"]:
            kv = row.get("peak_kv_usage")
            lines.append(f"| {row['request_rate']} | {row['completed']}/{row['num_requests']} | "
                         f"{row['request_throughput']:.2f} | {row['output_throughput']:.0f} | "
                         f"{_ms(row, 'median_ttft_ms')} | {_ms(row, 'p99_ttft_ms')} | "
                         f"{_ms(row, 'median_tpot_ms')} | {_ms(row, 'p99_tpot_ms')} | "
                         f"{f'{kv:.0%}' if kv is not None else '-'} | "
                         f"{'yes' if row.get('truncated') else 'no'} |")
        saturated = r.get("saturated_at_rate")
        lines += ["", f"Saturation: {f'at {saturated:g} req/s offered' if saturated else 'not reached by the finite rates'}"
                  f"; the `inf` row is the saturated throughput.", ""]
    for note in r["notes"]:
        lines.append(f"- {note}")
    if "server_exit_code" in r:
        code = r["server_exit_code"]
        shown = f"exit code {code}" if code is not None else "killed after 30 s"
        lines += ["", f"Shutdown (SIGTERM): {shown} in {r['shutdown_seconds']:.1f} s, "
                  f"{'clean' if r['server_clean_exit'] else 'NOT clean (see server.log)'}."]
    return "\n".join(lines) + "\n"


def _ms(row: dict, key: str) -> str:
    return f"{row[key]:.1f} ms" if row.get(key) is not None else "-"


if __name__ == "__main__":
    # A SIGTERM (e.g. from `timeout`) ends the run through main's handler: the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
