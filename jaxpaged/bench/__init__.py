"""Benchmarks, as `jaxpaged bench throughput | serve | startup`.

- `datasets`: seeded synthetic workloads (random, sharegpt-like, shared-prefix) as token ids.
- `metrics`: per-request records -> req/s, tok/s, TTFT/TPOT/ITL mean, median, p99; table + JSON.
- `throughput`: offline, in-process, on the engine (with host vs device time per step).
- `serve`: online, against any OpenAI-compatible `/v1/completions` (Poisson rate or fixed
  concurrency, streaming, so TTFT and inter-token latency are timed per chunk).
- `startup`: process start to engine ready, cold and warm compilation cache, programs compiled.

Host modules (datasets, metrics, serve) import no JAX.
"""
