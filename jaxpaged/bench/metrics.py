"""Per-request records -> the numbers a benchmark reports; table and JSON. Host-side, no JAX.

TTFT is from a request's submission (its arrival, online) to its first output token. TPOT is a
request's (last token - first token) / (output tokens - 1). ITL is every gap between consecutive
output chunks, pooled over all requests. Percentiles are numpy's linear interpolation.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int = 0  # output tokens actually produced
    ttft: float | None = None  # seconds
    latency: float | None = None  # seconds, submission to last token
    itls: list[float] = field(default_factory=list)  # seconds between consecutive output chunks
    error: str | None = None


def summarize(records: list[RequestRecord], duration: float, **extra) -> dict:
    ok = [r for r in records if r.error is None and r.output_len > 0]
    output_tokens = sum(r.output_len for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    result = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots),
                         ("itl", [x for r in ok for x in r.itls]), ("e2el", [r.latency for r in ok])):
        ms = 1e3 * np.asarray(values, float)
        for stat, fn in (("mean", np.mean), ("median", np.median),
                         ("p99", lambda a: np.percentile(a, 99))):
            result[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
    errors = sorted({r.error for r in records if r.error})
    if errors:
        result["errors"] = errors[:5]
    result.update(extra)
    return result


_ROWS = [
    ("Successful requests", "completed", "{:d}"), ("Failed requests", "failed", "{:d}"),
    ("Benchmark duration (s)", "duration_s", "{:.2f}"),
    ("Total input tokens", "total_input_tokens", "{:d}"),
    ("Total output tokens", "total_output_tokens", "{:d}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", "{:.1f}"),
    ("Peak KV-cache usage", "peak_kv_usage", "{:.1%}"),
    ("Prefix-cache hit rate", "prefix_cache_hit_rate", "{:.1%}"),
    ("Compiles during the run", "compiles_during_run", "{:d}"),
    ("Preemptions", "preemptions", "{:d}"),
    ("Engine steps", "num_steps", "{:d}"),
    ("Mean step (ms)", "mean_step_ms", "{:.2f}"),
    ("  of which execute: device + dispatch (ms)", "mean_execute_ms", "{:.2f}"),
    ("  of which host: schedule, inputs, update (ms)", "mean_host_ms", "{:.2f}"),
]


def format_table(title: str, result: dict) -> str:
    lines = [f"{'=' * 20} {title} {'=' * 20}"]
    for label, key, fmt in _ROWS:
        if result.get(key) is not None:
            lines.append(f"{label:<46}{fmt.format(result[key]):>12}")
    for name, label in (("ttft", "Time to first token"), ("tpot", "Time per output token"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        lines.append(f"{'-' * 8} {label} (ms) {'-' * 8}")
        for stat in ("mean", "median", "p99"):
            value = result.get(f"{stat}_{name}_ms")
            shown = f"{value:.2f}" if value is not None else "-"
            lines.append(f"{stat.capitalize() + ' ' + name.upper():<46}{shown:>12}")
    return "\n".join(lines)


def save_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
