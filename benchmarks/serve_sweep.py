"""Serving benchmark: a concurrency sweep of `jaxpaged bench serve` against an OpenAI-compatible
server (a `jaxpaged serve` started here, or the one at --url).

For each concurrency level, `random` token-id prompts (lengths uniform in --input-len x (1 -/+
--range-ratio)), EOS ignored, at most that many requests in flight; TTFT, TPOT and ITL per level.

    python3 benchmarks/serve_sweep.py                       # CPU, SmolLM2 (default sizes)
    python3 benchmarks/serve_sweep.py --smoke               # seconds; exercises the code
    python3 benchmarks/serve_sweep.py --url http://host:8000 --model NAME
"""

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpaged.bench.datasets import random_requests  # noqa: E402
from jaxpaged.bench.metrics import save_json  # noqa: E402
from jaxpaged.bench.serve import launch_server, run_benchmark, stop_server  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts-per-stream", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=30000)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "serve_sweep_cpu.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.prompts_per_stream = [1, 2], 1
        args.input_len, args.output_len, args.max_model_len = 16, 4, 128
        args.max_num_batched_tokens = 64

    process, url = None, args.url
    if url is None:
        serve_args = ["--max-num-seqs", str(max(args.concurrency)), "--max-model-len",
                      str(args.max_model_len), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        process, url = launch_server(serve_args + ([args.model] if args.model else []))
    try:
        import httpx

        model = args.model or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        rows = []
        for level in args.concurrency:
            requests = random_requests(max(level * args.prompts_per_stream, 2), args.input_len,
                                       args.output_len, args.range_ratio, args.vocab_size,
                                       args.seed + level)
            row = asyncio.run(run_benchmark(url, model, requests, max_concurrency=level,
                                            ignore_eos=True, seed=args.seed))
            rows.append({"concurrency": level, **row})
            print(f"c={level:>3} requests={row['completed']:>3} | {row['output_throughput']:7.1f} out tok/s | "
                  f"TTFT p50 {row['median_ttft_ms']:7.0f} ms p99 {row['p99_ttft_ms']:7.0f} ms | "
                  f"TPOT p50 {row['median_tpot_ms']:6.1f} ms | ITL p50 {row['median_itl_ms']:6.1f} ms "
                  f"p99 {row['p99_itl_ms']:6.1f} ms", flush=True)
    finally:
        if process is not None:
            stop_server(process)
    if not args.smoke:
        save_json(args.out, {"command": "python3 benchmarks/serve_sweep.py " + " ".join(argv or sys.argv[1:]),
                             "machine": f"cpus={os.cpu_count()}", "args": vars(args), "rows": rows})
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
