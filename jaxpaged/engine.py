"""The engine: request in, tokens out, one `step()` at a time.

    request ─► tokenizer ─► Scheduler.schedule() ─► StepInputs (padded to a bucket)
            ─► runner.dispatch (forward on pages + sampling, one jit each) ─► token ids
            ─► Scheduler.update ─► detokenize, stop strings ─► RequestOutput

With async scheduling (the default) a step dispatches step N+1 before it waits for step N's ids,
so the host's scheduling, input building and detokenizing overlap the device's work instead of
leaving it idle; outputs then come back one `step()` after their tokens were dispatched. Batches
that need every token on the host first (penalties read the history; prompt logprobs read the
step's hidden states) run synchronously.
"""

import logging
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.config import KV_CACHE_DTYPES, EngineConfig, pick_bucket
from jaxpaged.detokenizer import IncrementalDetokenizer
from jaxpaged.model_source import resolve_model
from jaxpaged.models.params import load_params, param_shardings, random_params
from jaxpaged.models.quant import quantize_params
from jaxpaged.pages import PageManager
from jaxpaged.request import CompletionOutput, Request, RequestOutput
from jaxpaged.runner import ModelRunner, device_kv_budget, kv_bytes_per_page
from jaxpaged.sampling_params import SamplingParams, draw_kind
from jaxpaged.scheduler import ScheduledBatch, Scheduler
from jaxpaged.sharding import ShardingPlan
from jaxpaged.step_inputs import MAX_BANNED, build_step_inputs

logger = logging.getLogger("jaxpaged")

CPU_KV_BUDGET_BYTES = 1 << 30  # default KV cache on CPU, where the device can't report memory


@dataclass
class RequestGroup:
    """One user request: `n` sequences sampled from the same prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)


class Engine:
    def __init__(self, config: EngineConfig):
        begin = time.perf_counter()
        self.config = config
        self.source = resolve_model(config.model, config.load_format)
        self.model_config = self.source.model_config()
        read_config = time.perf_counter()
        self.tokenizer = self.source.tokenizer()  # None: no tokenizer, prompts are token ids
        self.generation_defaults = self.source.generation_config(self.tokenizer)
        read_tokenizer = time.perf_counter()
        self.dtype = resolve_dtype(config.dtype)  # the first device query starts the backend
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        if self.kv_dtype.itemsize < 4 and jax.devices()[0].platform == "cpu":
            # XLA's CPU backend widens a bf16 or FP8 array to update a slice of it: every step
            # converts each layer's whole cache twice (SmolLM2 decode ~18x slower in FP8).
            logger.warning("a %s KV cache on CPU is correct but slow: each step converts the whole "
                           "cache; use it on GPUs and TPUs", self.kv_dtype.name)
        self.plan = ShardingPlan.build(self.model_config, config.tensor_parallel_size)
        for note in self.plan.notes:
            logger.info("tensor parallelism: %s", note)
        configured = time.perf_counter()
        self.params = self._quantized(self._load_params())
        jax.block_until_ready(self.params)
        loaded = time.perf_counter()

        model_len = self.model_config.max_position_embeddings
        self.max_model_len = config.max_model_len or model_len
        if self.max_model_len > model_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({model_len})")
        self.token_buckets = config.resolved_token_buckets()
        self.page_size = config.resolved_page_size(jax.devices()[0].platform)
        self.pages_per_seq = -(-self.max_model_len // self.page_size)
        num_pages = self._num_pages()
        self.pages = PageManager(num_pages, self.page_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pages, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len,
                                   share_pages_within_step=jax.devices()[0].platform != "tpu")
        self.runner = ModelRunner(
            self.model_config, self.params, num_pages=num_pages, page_size=self.page_size,
            max_num_seqs=config.max_num_seqs, pages_per_seq=self.pages_per_seq,
            max_model_len=self.max_model_len, token_buckets=self.token_buckets,
            attention_backend=config.attention_backend, kv_dtype=self.kv_dtype, plan=self.plan,
            quantization=config.quantization)
        self.eos_token_ids = self._eos_token_ids()
        self.groups: dict[str, RequestGroup] = {}
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = jax.devices()[0].platform != "cpu"
        self._sync_groups: set[str] = set()  # requests whose steps must run synchronously
        self._in_flight = None  # (ScheduledBatch, device SampleOutput) dispatched, not yet fetched
        self._rng = np.random.default_rng(config.seed)
        built = time.perf_counter()
        self.num_compiles, self.warmup_seconds = self.runner.warmup()
        # Where start-up goes (`jaxpaged bench startup` reports it; the log gets one line).
        self.setup_seconds = {"config": read_config - begin, "tokenizer": read_tokenizer - read_config,
                              "devices": configured - read_tokenizer, "weights": loaded - configured,
                              "kv_cache_and_runner": built - loaded, "warmup": self.warmup_seconds}
        logger.info("engine set-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.setup_seconds.items()))
        logger.info("warm-up compiled %d programs in %.1f s", self.num_compiles, self.warmup_seconds)
        slowest = sorted(self.runner.compile_seconds.items(), key=lambda item: -item[1])[:4]
        logger.info("warm-up: lowering %.1f s, then compiles in parallel; slowest: %s",
                    self.runner.lowering_seconds, ", ".join(f"{k} {v:.1f} s" for k, v in slowest))

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, cache_salt: str | None = None) -> None:
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        num_prompt = len(prompt_token_ids)
        if self.tokenizer is None and params.stop_strings:
            raise ValueError("stop strings need a tokenizer, and this model has none "
                             "(a shipped config with load_format='dummy'); use stop_token_ids")
        if params.min_tokens and len(set(params.stop_token_ids) | self.eos_token_ids) > MAX_BANNED:
            raise ValueError(f"with min_tokens, at most {MAX_BANNED} stop_token_ids (EOS included) "
                             "are supported")
        max_tokens = params.max_tokens or max(self.max_model_len - num_prompt, 1)
        sequences, detokenizers = [], []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else int(self._rng.integers(2**31))
            sequences.append(Request(
                request_id=f"{request_id}-{i}", prompt_token_ids=list(prompt_token_ids),
                params=params, seed=seed, eos_token_ids=self.eos_token_ids, max_tokens=max_tokens,
                cache_salt=cache_salt))
            detokenizers.append(IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop_strings=params.stop_strings,
                include_stop_str_in_output=params.include_stop_str_in_output)
                if self.tokenizer is not None else None)  # no tokenizer: token ids, no text
        for i, seq in enumerate(sequences):
            try:
                self.scheduler.add(seq)
            except ValueError:
                for added in sequences[:i]:
                    self.scheduler.finish(added, "abort")
                raise
        self.groups[request_id] = RequestGroup(request_id, prompt, list(prompt_token_ids),
                                               sequences, detokenizers)
        if params.uses_penalties or params.prompt_logprobs is not None:
            self._sync_groups.add(request_id)

    def abort(self, request_id: str) -> None:
        """Ends a request wherever it is, freeing its pages at once."""
        group = self.groups.pop(request_id, None)
        self._sync_groups.discard(request_id)
        for seq in group.sequences if group else ():
            self.scheduler.finish(seq, "abort")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and dispatches one step; returns the outputs of the step whose ids arrived
        (under async scheduling, the previous one)."""
        try:
            if self.async_scheduling and not self._sync_groups:
                return self._step_async()
            outputs = self._finish_in_flight()  # the queue drains before a synchronous step
            return outputs + self._step_sync()
        except BaseException:
            self._in_flight = None  # a failed step's results will never arrive
            self.scheduler.drop_uncommitted()  # nor will the pages it was to compute
            raise

    def _step_sync(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        penalties = any(r.params.uses_penalties for r in batch.requests)
        logprobs = any(r.params.logprobs is not None for r in batch.requests)
        out = self.runner.dispatch(self._inputs(batch, penalties), apply_penalties=penalties,
                                   with_logprobs=logprobs,
                                   draw=draw_kind(r.params for r in batch.requests))
        self._record_prompt_logprobs(batch)
        sampled = self.runner.fetch(out)
        advanced = self.scheduler.update(batch, sampled.token_ids)
        return self._postprocess(batch, advanced, sampled)

    def _step_async(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        in_flight = None
        if batch:
            logprobs = any(r.params.logprobs is not None for r in batch.requests)
            out = self.runner.dispatch(self._inputs(batch, False), apply_penalties=False,
                                       with_logprobs=logprobs,
                                       draw=draw_kind(r.params for r in batch.requests))
            self.scheduler.commit(batch)
            in_flight = (batch, out)
        outputs = self._finish_in_flight()  # waits for the previous step while this one queues
        self._in_flight = in_flight
        return outputs

    def _finish_in_flight(self) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        batch, out = self._in_flight
        self._in_flight = None
        sampled = self.runner.fetch(out)
        advanced = self.scheduler.update(batch, sampled.token_ids)
        return self._postprocess(batch, advanced, sampled)

    def _inputs(self, batch: ScheduledBatch, penalties: bool):
        bucket = pick_bucket(self.token_buckets, batch.total_tokens)
        return build_step_inputs(
            batch.requests, batch.num_new_tokens, token_bucket=bucket,
            max_num_seqs=self.runner.seq_slots(bucket), pages_per_seq=self.pages_per_seq,
            history_width=self.runner.history_width(penalties))

    def _record_prompt_logprobs(self, batch: ScheduledBatch) -> None:
        """Scores the step's prompt positions for requests that asked for prompt logprobs.

        The hidden state at position p predicts token p + 1, so a chunk covering positions
        [start, start + n) scores the prompt tokens after them. A preempted request recomputes
        from 0; positions it already recorded are skipped. Runs before `Scheduler.update` moves
        `num_computed_tokens` past the chunk.
        """
        rows, targets, owners = [], [], []
        offset = 0
        for request, n in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            if request.params.prompt_logprobs is not None:
                first = max(start, len(request.prompt_logprobs))  # next position not yet recorded
                last = min(start + n, request.num_prompt_tokens - 1)
                for p in range(first, last):
                    rows.append(offset + p - start)
                    targets.append(request.prompt_token_ids[p + 1])
                    owners.append(request)
            offset += n
        if not rows:
            return
        target_lps, top_ids, top_lps = self.runner.prompt_logprobs(np.array(rows, np.int32),
                                                                   np.array(targets, np.int32))
        for i, (request, token) in enumerate(zip(owners, targets)):
            k = request.params.prompt_logprobs
            top = zip(top_ids[i, :k].tolist(), top_lps[i, :k].tolist())
            request.prompt_logprobs.append({token: float(target_lps[i]), **dict(top)})

    def _postprocess(self, batch: ScheduledBatch, advanced: list[Request], sampled) -> list[RequestOutput]:
        rows = {id(r): i for i, r in enumerate(batch.requests)}
        touched: dict[str, RequestGroup] = {}
        for seq in advanced:
            group_id, index = seq.request_id.rsplit("-", 1)
            group = self.groups[group_id]
            touched[group_id] = group
            row, token = rows[id(seq)], seq.output_token_ids[-1]
            if seq.params.logprobs is not None:
                top = seq.params.logprobs
                seq.logprobs.append((float(sampled.logprobs[row]),
                                     list(zip(sampled.top_ids[row, :top].tolist(),
                                              sampled.top_logprobs[row, :top].tolist()))))
            if seq.finish_reason == "stop" and (isinstance(seq.stop_reason, int)
                                                or seq.stop_reason is None):
                continue  # EOS or a stop token id: not part of the text
            detokenizer = group.detokenizers[int(index)]
            stop = detokenizer.add_token(token) if detokenizer is not None else None
            if stop is not None:
                if seq.finished:  # also hit max_tokens: the stop string still wins
                    seq.finish_reason, seq.stop_reason = "stop", stop
                else:
                    self.scheduler.finish(seq, "stop", stop)
        outputs = [self._output(group) for group in touched.values()]
        for group in touched.values():
            if group.finished:
                del self.groups[group.request_id]
                self._sync_groups.discard(group.request_id)
        return outputs

    def _output(self, group: RequestGroup) -> RequestOutput:
        completions = []
        for i, (seq, detok) in enumerate(zip(group.sequences, group.detokenizers)):
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = [{token: lp, **dict(top)}
                            for token, (lp, top) in zip(seq.output_token_ids, seq.logprobs)]
            completions.append(CompletionOutput(
                index=i, text=detok.text if detok is not None else "",
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=sum(lp for lp, _ in seq.logprobs) if seq.logprobs else None,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        first = group.sequences[0]
        prompt_logprobs = None
        if first.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *first.prompt_logprobs]
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             group.finished, prompt_logprobs)

    # ---- set-up helpers ----------------------------------------------------------------------

    def _load_params(self) -> dict:
        if self.config.load_format == "dummy":  # random weights of the real shapes, drawn on device
            return random_params(self.model_config, self.dtype, seed=self.config.seed,
                                 plan=self.plan)
        if self.source.kind == "jaxpaged":  # a `jaxpaged convert` checkpoint: orbax, restored sharded
            from conversions.orbax_loader import restore_params

            return restore_params(self.source.path, self.model_config, self.dtype, self.plan)
        return load_params(self.model_config, self.source.weights(), self.dtype, self.plan)

    def _quantized(self, params: dict) -> dict:
        method = self.config.quantization
        if method is None:
            return params
        return quantize_params(params, param_shardings(self.plan, method), method)

    def _num_pages(self) -> int:
        config = self.config
        if config.num_pages:
            return config.num_pages
        per_page = kv_bytes_per_page(self.plan.config, self.page_size,
                                     self.kv_dtype.itemsize, config.tensor_parallel_size)
        budget = config.kv_cache_memory_bytes or device_kv_budget(self.params, config.gpu_memory_utilization)
        if budget is None:  # CPU: enough for every sequence at full length, within a fixed budget
            full = config.max_num_seqs * self.pages_per_seq * per_page
            budget = min(full, CPU_KV_BUDGET_BYTES)
        num_pages = budget // per_page
        if num_pages < self.pages_per_seq:
            raise ValueError(
                f"the KV cache budget ({budget / 2**20:.0f} MiB) holds {num_pages} pages, fewer than "
                f"one sequence of max_model_len={self.max_model_len} needs ({self.pages_per_seq}); "
                "lower max_model_len or raise the memory budget")
        return int(num_pages)

    def _eos_token_ids(self) -> frozenset[int]:
        ids = self.generation_defaults.get("eos_token_id")
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def resolve_kv_dtype(name: str, model_dtype):
    """The KV cache's dtype for EngineConfig.kv_cache_dtype: the model's, or an FP8 format."""
    return jnp.dtype(KV_CACHE_DTYPES[name] or model_dtype)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache under the jaxpaged cache dir (set once per process).
    It keeps every program, however quickly it compiled: with a threshold (0.5 s here before)
    the eight random-weight draws of an 8B dummy model, ~0.23 s each on the H100, compiled
    again on every start."""
    from jaxpaged.model_source import cache_dir

    if jax.config.jax_compilation_cache_dir is None:
        path = os.environ.get("JAXPAGED_COMPILE_CACHE") or str(cache_dir() / "xla")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
