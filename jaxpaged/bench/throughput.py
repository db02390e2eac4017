"""`jaxpaged bench throughput`: offline, in-process, every request submitted at once (vLLM's
`benchmark_throughput`), with the engine stepped by hand so each token's arrival is timed.

Besides tok/s it reports where a step's time goes: `execute` (dispatching the compiled forward +
sampler and waiting for the sampled ids) against the rest of `Engine.step` (scheduling, building
inputs, bookkeeping). Under async scheduling the host's part overlaps the device's work, so the
wait shrinks by about as much as the host part costs.
"""

import time

from jaxpaged.bench.datasets import (BenchRequest, check_dataset_args, describe_workload,
                                     make_requests)
from jaxpaged.bench.metrics import RequestRecord, format_table, save_json, summarize


def run_offline(engine, requests: list[BenchRequest], *, ignore_eos: bool,
                request_prefix: str = "bench", max_seconds: float | None = None) -> dict:
    """Submits every request, steps the engine until all finish, returns the summary.

    With `max_seconds`, stops there: unfinished requests are aborted and count as failed, and
    `truncated` is set; `produced_output_throughput` still counts every token produced.
    """
    from jaxpaged.runner import CompileCounter
    from jaxpaged.sampling_params import SamplingParams

    records = {f"{request_prefix}-{i}": RequestRecord(len(r.prompt_token_ids))
               for i, r in enumerate(requests)}
    scheduler, pages = engine.scheduler, engine.pages
    hits0, queries0 = scheduler.prefix_cache_hits, scheduler.prefix_cache_queries
    preemptions0 = scheduler.num_preemptions
    execute_seconds, step_seconds = [], []
    runner = engine.runner

    def timed(method):
        def call(*args, **kwargs):
            begin = time.perf_counter()
            out = method(*args, **kwargs)
            execute_seconds.append(time.perf_counter() - begin)
            return out
        return call

    # Instance attributes shadow the methods while timing.
    runner.dispatch, runner.fetch = timed(runner.dispatch), timed(runner.fetch)
    peak_usage = 0.0
    try:
        with CompileCounter() as compiles:
            start = time.perf_counter()
            for (request_id, record), request in zip(records.items(), requests):
                params = SamplingParams(temperature=0.0, max_tokens=request.output_len,
                                        ignore_eos=ignore_eos)
                engine.add_request(request_id, request.prompt_token_ids, params)
            last_seen = {}
            truncated = False
            while engine.has_unfinished:
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    truncated = True
                    for request_id, record in records.items():
                        if record.latency is None:
                            engine.abort(request_id)
                            record.error = f"unfinished after the {max_seconds:.0f} s limit"
                    break
                begin = time.perf_counter()
                outputs = engine.step()
                now = time.perf_counter()
                step_seconds.append(now - begin)
                peak_usage = max(peak_usage, pages.usage)
                for output in outputs:
                    record = records[output.request_id]
                    produced = len(output.outputs[0].token_ids)
                    if produced > record.output_len:
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.itls.append(now - last_seen[output.request_id])
                        last_seen[output.request_id] = now
                        record.output_len = produced
                    if output.finished:
                        record.latency = now - start
            duration = time.perf_counter() - start
    finally:
        del runner.dispatch, runner.fetch
    hits = scheduler.prefix_cache_hits - hits0
    queries = scheduler.prefix_cache_queries - queries0
    num_steps = len(step_seconds)
    produced = sum(r.output_len for r in records.values())
    step_total, execute_total = sum(step_seconds), sum(execute_seconds)
    return summarize(
        list(records.values()), duration, peak_kv_usage=peak_usage,
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        truncated=truncated, produced_output_tokens=produced,
        produced_output_throughput=produced / duration,
        compiles_during_run=compiles.count, preemptions=scheduler.num_preemptions - preemptions0,
        num_steps=num_steps, mean_step_ms=1e3 * step_total / max(num_steps, 1),
        mean_execute_ms=1e3 * execute_total / max(num_steps, 1),
        mean_host_ms=1e3 * (step_total - execute_total) / max(num_steps, 1))


def engine_summary(engine) -> dict:
    """The engine facts a result must carry to be reproducible."""
    import jax

    from jaxpaged.attention import first_chunk_backend, resolve_backend

    device = jax.devices()[0]
    config = engine.config
    return {"model": engine.source.name, "load_format": config.load_format,
            "quantization": config.quantization,
            "dtype": jax.numpy.dtype(engine.dtype).name,
            "kv_cache_dtype": jax.numpy.dtype(engine.kv_dtype).name,
            "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
            "attention_backend": resolve_backend(config.attention_backend, device.platform),
            "first_chunk_attention": first_chunk_backend(config.attention_backend, device.platform),
            "num_pages": engine.pages.num_pages, "page_size": engine.page_size,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_model_len": engine.max_model_len, "token_buckets": list(engine.token_buckets),
            "warmup_programs": engine.num_compiles, "warmup_seconds": engine.warmup_seconds,
            "warmup_lowering_seconds": engine.runner.lowering_seconds,
            "program_compile_seconds": engine.runner.compile_seconds,
            "enable_prefix_caching": config.enable_prefix_caching,
            "async_scheduling": engine.async_scheduling}


def main(args, engine_kwargs: dict, command: str) -> int:
    from jaxpaged.llm import LLM

    check_dataset_args(args)
    model = engine_kwargs.pop("model")
    start = time.perf_counter()
    llm = LLM(model, **engine_kwargs)
    setup_seconds = time.perf_counter() - start
    requests = make_requests(args, llm.engine.model_config.vocab_size)
    result = run_offline(llm.engine, requests, ignore_eos=args.ignore_eos)
    print(format_table("Offline throughput", result))
    report = {"command": command, "engine": engine_summary(llm.engine),
              "setup_seconds": setup_seconds, "workload": describe_workload(args), "result": result}
    if args.output_json:
        save_json(args.output_json, report)
        print(f"saved {args.output_json}")
    return 0
