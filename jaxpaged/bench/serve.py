"""`jaxpaged bench serve`: online, against any OpenAI-compatible server. Host-side, no JAX.

Requests go to `POST {base_url}/v1/completions` with `stream: true`, the prompt as token ids (or
as text, decoded with `--tokenizer`), `ignore_eos` when asked, and `stream_options.include_usage`
so the server's own count of output tokens is used. Arrivals are a Poisson process at
`--request-rate` (req/s; `inf` sends everything at once), optionally capped at `--max-concurrency`
requests in flight; the arrival times are seeded. With `max_seconds`, requests still unfinished
then are cancelled (their connections close, so the server aborts them) and count as failed. While
the run lasts, `/metrics` is polled for
the KV-cache usage gauge and the prefix-cache counters (jaxpaged's or vLLM's names); a server
without them just leaves those fields empty.
"""

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from jaxpaged.bench.datasets import BenchRequest, check_dataset_args, describe_workload, make_requests
from jaxpaged.bench.metrics import RequestRecord, format_table, save_json, summarize

_KV_USAGE = ("jaxpaged:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_HITS = ("jaxpaged:prefix_cache_hits_total", "vllm:prefix_cache_hits_total")
_QUERIES = ("jaxpaged:prefix_cache_queries_total", "vllm:prefix_cache_queries_total")


async def one_request(client: httpx.AsyncClient, base_url: str, body: dict,
                      record: RequestRecord, headers: dict) -> None:
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itls.append(now - last)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    record.output_len = chunk["usage"]["completion_tokens"]
            record.output_len = record.output_len or chunks
            record.latency = (last or time.perf_counter()) - start
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        record.error = f"{type(error).__name__}: {error}"[:200]


async def poll_metrics(client: httpx.AsyncClient, base_url: str, state: dict, stop: asyncio.Event):
    """Keeps the peak KV usage and the latest prefix-cache counters in `state`."""
    while not stop.is_set():
        values = await read_metrics(client, base_url)
        if values:
            usage = _first(values, _KV_USAGE)
            if usage is not None:
                state["peak_kv_usage"] = max(state.get("peak_kv_usage", 0.0), usage)
            state["hits"], state["queries"] = _first(values, _HITS), _first(values, _QUERIES)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def read_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over label sets}; {} if unavailable."""
    try:
        response = await client.get(f"{base_url}/metrics", timeout=5)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        try:
            value = float(rest.rsplit(" ", 1)[-1])
        except ValueError:
            continue
        values[name.strip()] = values.get(name.strip(), 0.0) + value
    return values


async def run_benchmark(base_url: str, model: str, requests: list[BenchRequest], *,
                        request_rate: float = math.inf, max_concurrency: int | None = None,
                        ignore_eos: bool = False, prompts: list | None = None, seed: int = 0,
                        api_key: str | None = None, max_seconds: float | None = None) -> dict:
    """Sends the requests, returns the summary. `prompts` (text) replaces the token ids if given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records = [RequestRecord(len(r.prompt_token_ids)) for r in requests]
    gaps = (np.random.default_rng(seed).exponential(1.0 / request_rate, len(requests))
            if math.isfinite(request_rate) else np.zeros(len(requests)))
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    timeout = httpx.Timeout(3600, connect=60)
    limits = httpx.Limits(max_connections=(max_concurrency or len(requests)) + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        state, stop = {}, asyncio.Event()
        base = await read_metrics(client, base_url)
        poller = asyncio.create_task(poll_metrics(client, base_url, state, stop))

        async def limited(body, record):
            async with limit:
                await one_request(client, base_url, body, record, headers)

        tasks = []
        start = time.perf_counter()
        end = start + max_seconds if max_seconds is not None else math.inf
        for i, (request, record, gap) in enumerate(zip(requests, records, gaps)):
            if gap:
                await asyncio.sleep(gap)
            if time.perf_counter() >= end:
                break
            body = {"model": model, "max_tokens": request.output_len, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True},
                    "prompt": prompts[i] if prompts is not None else request.prompt_token_ids}
            if ignore_eos:
                body["ignore_eos"] = True
            tasks.append(asyncio.create_task(limited(body, record)))
        pending = set()
        if tasks:
            timeout = None if max_seconds is None else max(0.0, end - time.perf_counter())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
        stop.set()
        await poller
        final = await read_metrics(client, base_url)
    extra = {"request_rate": request_rate if math.isfinite(request_rate) else "inf",
             "max_concurrency": max_concurrency, "peak_kv_usage": state.get("peak_kv_usage")}
    if max_seconds is not None:
        unfinished = [r for r in records if r.error is None and r.latency is None]
        for record in unfinished:
            record.error = f"unfinished after the {max_seconds:.0f} s limit"
        extra.update(truncated=bool(unfinished), unfinished=len(unfinished))
    hits, queries = _first(final, _HITS), _first(final, _QUERIES)
    if hits is not None and queries is not None:
        queries -= _first(base, _QUERIES) or 0.0
        extra["prefix_cache_hit_rate"] = (hits - (_first(base, _HITS) or 0.0)) / queries if queries else 0.0
    return summarize(records, duration, **extra)


def _first(values: dict, names: tuple[str, ...]) -> float | None:
    return next((values[n] for n in names if n in values), None)


# ---- a local server, for sweeps and tests -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(serve_args: list[str], timeout: float = 900, *, env: dict | None = None,
                  log_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `jaxpaged serve SERVE_ARGS` on a free local port; returns (process, base URL)
    once /health answers. The child runs this checkout's jaxpaged (installed or not) with `env`
    (default: ours); its output goes to `log_path` if given."""
    port = free_port()
    command = [sys.executable, "-m", "jaxpaged.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--uvicorn-log-level", "warning", *serve_args]
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log or subprocess.DEVNULL,
                               stderr=log or subprocess.PIPE, text=True, env=env)
    if log:
        log.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = open(log_path).read() if log_path else process.stderr.read()
                raise RuntimeError(f"the server exited: {output[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s")
    except BaseException:  # timed out, or we were interrupted: no orphaned server
        process.kill()
        process.wait()
        raise


def stop_server(process: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` s; the exit code, or None if it had to be killed."""
    process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


# ---- the command --------------------------------------------------------------------------------

def main(args, command: str) -> int:
    check_dataset_args(args)
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be positive (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be a positive integer")
    base_url = args.base_url.rstrip("/")
    model = args.model or served_model(base_url, args.api_key)
    requests = make_requests(args, args.vocab_size)
    prompts = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        prompts = [tokenizer.decode(r.prompt_token_ids) for r in requests]
    result = asyncio.run(run_benchmark(
        base_url, model, requests, request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos, prompts=prompts,
        seed=args.seed, api_key=args.api_key))
    print(format_table("Serving benchmark", result))
    if args.output_json:
        save_json(args.output_json, {"command": command, "base_url": base_url, "model": model,
                                     "workload": describe_workload(args), "result": result})
        print(f"saved {args.output_json}")
    return 0 if result["failed"] == 0 else 1


def served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise RuntimeError(f"could not list the models of {base_url} ({error}); pass --model") from None
