"""Serving benchmark: a concurrency sweep of streaming clients against an OpenAI-compatible server.

Starts `jaxpaged serve` on 127.0.0.1 (or measures the server at --url), then for each concurrency
level keeps that many streaming `/v1/completions` requests in flight until the level's prompts are
done. Prompts are token ids (no tokenizer on the client side) with mixed lengths; EOS is ignored
so each request produces exactly its max_tokens. Reports TTFT and inter-token latency (ITL)
p50/p99, and output tokens/s per level.

    python3 benchmarks/serve_sweep.py                       # CPU, SmolLM2 (default sizes)
    python3 benchmarks/serve_sweep.py --smoke               # seconds; exercises the code
    python3 benchmarks/serve_sweep.py --url http://host:8000 --model NAME
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "jaxpaged.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(max(args.concurrency)), "--max-model-len", str(args.max_model_len),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.model:
        command.append(args.model)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("the server did not become healthy within 600 s")


async def one_request(client, url, model, prompt, max_tokens) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "itl": np.diff(stamps).tolist(), "end": stamps[-1] - start}


async def run_level(url, model, prompts, max_tokens, concurrency) -> dict:
    queue = list(zip(prompts, max_tokens))
    results = []

    async def worker(client):
        while queue:
            prompt, n = queue.pop(0)
            results.append(await one_request(client, url, model, prompt, n))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    itl = np.array([x for r in results for x in r["itl"]]) * 1e3
    return {"concurrency": concurrency, "requests": len(results), "seconds": elapsed,
            "output_tok_s": sum(max_tokens) / elapsed,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(itl, 50)) if itl.size else None,
            "itl_p99_ms": float(np.percentile(itl, 99)) if itl.size else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts-per-stream", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--output-len", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "serve_sweep_cpu.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.prompts_per_stream = [1, 2], 1
        args.prompt_len, args.output_len, args.max_model_len = [8, 24], [3, 5], 128
        args.max_num_batched_tokens = 64

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args)
    try:
        model = args.model or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        rng = np.random.default_rng(args.seed)
        rows = []
        for level in args.concurrency:
            n = max(level * args.prompts_per_stream, 2)
            lengths = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, n)
            prompts = [rng.integers(100, 30000, int(k)).tolist() for k in lengths]
            max_tokens = rng.integers(args.output_len[0], args.output_len[1] + 1, n).tolist()
            row = asyncio.run(run_level(url, model, prompts, max_tokens, level))
            rows.append(row)
            print(f"c={level:>3} requests={row['requests']:>3} | {row['output_tok_s']:7.1f} out tok/s | "
                  f"TTFT p50 {row['ttft_p50_ms']:7.0f} ms p99 {row['ttft_p99_ms']:7.0f} ms | "
                  f"ITL p50 {row['itl_p50_ms']:6.1f} ms p99 {row['itl_p99_ms']:6.1f} ms", flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    if not args.smoke:
        report = {"command": "python3 benchmarks/serve_sweep.py " + " ".join(argv or sys.argv[1:]),
                  "machine": f"cpus={os.cpu_count()}", "args": vars(args), "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
