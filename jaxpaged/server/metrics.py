"""Prometheus metrics, named `jaxpaged:*` like vLLM's `vllm:*`. One registry per app: no globals."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; vLLM's buckets, trimmed.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0)
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=self.registry)

        def gauge(name, doc):
            return Gauge(name, doc, **labels).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, **labels).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, buckets=buckets, **labels).labels(model_name)

        self.num_running = gauge("jaxpaged:num_requests_running", "Sequences running on the engine.")
        self.num_waiting = gauge("jaxpaged:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("jaxpaged:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).")
        self.prompt_tokens = counter("jaxpaged:prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("jaxpaged:generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("jaxpaged:num_preemptions",
                                       "Sequences preempted (recomputed).")
        self.prefix_cache_queries = counter("jaxpaged:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("jaxpaged:prefix_cache_hits",
                                         "Prompt tokens served from the prefix cache.")
        self.ttft = histogram("jaxpaged:time_to_first_token_seconds",
                              "Arrival to first generated token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("jaxpaged:inter_token_latency_seconds",
                                             "Time between a request's consecutive outputs.",
                                             ITL_BUCKETS)
        self.e2e_latency = histogram("jaxpaged:e2e_request_latency_seconds",
                                     "Arrival to finish (or abort).", E2E_BUCKETS)
        self.warmup_programs = gauge("jaxpaged:warmup_programs",
                                     "Programs the engine compiled at start-up.")
        self.compiles_after_warmup = gauge("jaxpaged:compiles_after_warmup",
                                           "XLA compilations since the server started (should stay 0).")
        finished = Counter("jaxpaged:request_success", "Finished sequences by finish reason.",
                           labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._finished = {reason: finished.labels(model_name, reason) for reason in FINISH_REASONS}

    def watch(self, stats) -> None:
        """Read the gauges from `stats()` (the engine thread's latest snapshot) at scrape time."""
        self.num_running.set_function(lambda: stats().num_running)
        self.num_waiting.set_function(lambda: stats().num_waiting)
        self.kv_usage.set_function(lambda: stats().kv_usage)

    def watch_compiles(self, warmup_programs: int, compile_count=None) -> None:
        """`compile_count()`: compilations since the server started; without it the gauge is NaN."""
        self.warmup_programs.set(warmup_programs)
        if compile_count is None:
            self.compiles_after_warmup.set(float("nan"))
        else:
            self.compiles_after_warmup.set_function(compile_count)

    def count_finished(self, reasons) -> None:
        for reason in reasons:
            if reason in self._finished:
                self._finished[reason].inc()
