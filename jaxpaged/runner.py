"""The device side of a step: one jitted forward per token bucket, one jitted sampler, and one
program that scores hidden rows for prompt logprobs.

`dispatch` enqueues a step and returns at once with its sampled ids still on the device; `fetch`
waits for them. The engine uses the gap to schedule the next step while this one runs (async
scheduling): the next step's forward reads any token the host has not seen yet straight from the
previous step's sampled ids (`StepInputs.token_src`).

The runner owns the params and the paged KV cache (one array per layer, donated through the jit so
XLA updates it in place). Everything it is given per step is a `StepInputs` of fixed shape, so after
`warmup()` compiled every bucket, serving never compiles again. It reaches the device as two packed
int32 buffers (`step_inputs.pack`), copied before the forward is launched; the programs cut them
back into arrays (`unpack`).
"""

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.attention import get_kv_cache_shape, has_decode_only, make_attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.llama import forward, token_logprobs
from jaxpaged.models.params import param_shardings
from jaxpaged.models.quant import Fp8Ops, fp8_compiler_options
from jaxpaged.sampler import SampleOutput, sample
from jaxpaged.sampling_params import DRAW_KINDS, MAX_LOGPROBS
from jaxpaged.sharding import ShardingPlan
from jaxpaged.step_inputs import (AttentionMetadata, Layout, SamplingTensors, StepInputs,
                                  build_step_inputs, forward_arrays, pack)
from pallas_kernels import fp8_activations as fp8_kernels

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations while active (the recompilation tripwire)."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


PROMPT_LOGPROB_ROWS = 256  # hidden rows a prompt-logprob program scores at once

# (apply_penalties, with_logprobs, draw): penalties need the token history, logprobs a log-softmax
# and a top-k over the vocabulary, "filtered" draws a sort; most steps need none of them, so each
# costs only where it is used (and the host's choice keeps branches out of the program).
SAMPLER_VARIANTS = tuple((p, lp, d) for p in (False, True) for lp in (False, True)
                         for d in DRAW_KINDS)


class ModelRunner:
    def __init__(self, config: ModelConfig, params: dict, *, num_pages: int, page_size: int,
                 max_num_seqs: int, pages_per_seq: int, max_model_len: int,
                 token_buckets: tuple[int, ...], attention_backend: str, kv_dtype,
                 plan: ShardingPlan | None = None, quantization: str | None = None):
        # Under tensor parallelism the forward pass and the caches use the plan's padded config.
        self.plan = plan or ShardingPlan.build(config)
        config = self.config = self.plan.config
        self.params = params
        self.max_num_seqs = max_num_seqs
        self.pages_per_seq = pages_per_seq
        self.max_model_len = max_model_len
        self.token_buckets = token_buckets
        self.quantization = quantization
        platform = self.platform = jax.devices()[0].platform
        shape = get_kv_cache_shape(num_pages, page_size, config.num_kv_heads, config.head_dim)
        kv_sharding, rep = self.plan.kv_pages_sharding, self.plan.replicated
        self.kv_pages = [jnp.zeros(shape, kv_dtype, device=kv_sharding)
                         for _ in range(config.num_layers)]
        attention = functools.partial(make_attention, attention_backend, platform=platform,
                                      sm_scale=config.head_dim ** -0.5,
                                      sliding_window=config.sliding_window)
        # Decode-only steps (every sequence one token) land in the buckets up to the first that
        # holds max_num_seqs tokens; where the backend has a decode specialisation those buckets
        # get a second program (on the H100 one launch per layer instead of four: see
        # pallas_kernels/gpu_decode.py).
        self.decode_buckets = ()
        if has_decode_only(attention_backend, platform):
            last = next((b for b in token_buckets if b >= max_num_seqs), token_buckets[-1])
            self.decode_buckets = tuple(b for b in token_buckets if b <= last)
        self._forward_programs: dict = {}
        self._decode_programs: dict = {}
        self._sample_programs: dict = {}
        # Shardings are fixed here and in `warmup`, so they are part of every program's compile
        # key: params as declared, caches over KV heads, step inputs and outputs (logits
        # included) replicated, so sampling runs on replicated logits. (jit refuses in_shardings
        # beside keyword static args, so the sampler and scorer take theirs from the warmup's
        # example arguments instead.)
        params_sharding = param_shardings(self.plan, quantization)
        kv_shardings = [kv_sharding] * config.num_layers
        fp8_ops = pick_fp8_ops(platform, config, self.plan.tensor_parallel_size)
        # Called as (params, kv_pages, packed forward arrays, last_token_ids, their layout).
        self._forward, self._forward_decode = (jax.jit(
            functools.partial(_packed_forward_step, config=config, fp8_ops=fp8_ops,
                              attention=self.plan.shard_attention(attention(decode_only=decode_only))),
            in_shardings=(params_sharding, kv_shardings, rep, rep), static_argnums=(4,),
            out_shardings=(rep, rep, kv_shardings), donate_argnames=("kv_pages",))
            for decode_only in (False, True))
        self._sample = jax.jit(
            functools.partial(_sample_step, num_rows=max_num_seqs), out_shardings=rep,
            static_argnames=("layout", "apply_penalties", "num_top_logprobs", "draw"))
        # Prompt logprobs run on slices of this many hidden rows: one program for every bucket.
        # Each slice reads the whole LM head (1 GB in an 8B model), so slices are not small.
        self.prompt_logprob_rows = min(token_buckets[-1], PROMPT_LOGPROB_ROWS)
        self._token_logprobs = jax.jit(token_logprobs, out_shardings=rep,
                                       static_argnames=("num_top",))
        self._token_logprobs_program = None
        self._hidden = None  # [T, D] final-normed states of the last step's tokens
        self._last_token_ids = jnp.zeros(max_num_seqs, jnp.int32, device=rep)  # [S] last sampled

    def seq_slots(self, bucket: int) -> int:
        """Sequence rows of a step in `bucket`: the smallest bucket holds at most that many
        sequences, so its steps (batch-1 decoding lands there) compute logits and sample for that
        many rows, not for every sequence the engine could hold (0.2-0.3 ms of an 8B batch-1
        step on the H100). Other buckets keep `max_num_seqs`: each row count costs a set of
        sampler programs at start-up (~1.5 s)."""
        return min(bucket, self.max_num_seqs) if bucket == self.token_buckets[0] else self.max_num_seqs

    def history_width(self, apply_penalties: bool) -> int:
        return self.max_model_len if apply_penalties else 1

    def execute(self, inputs: StepInputs, *, apply_penalties: bool, with_logprobs: bool = False,
                draw: str = "filtered") -> SampleOutput:
        """Runs one step; returns the sampled tokens (and logprobs, if asked) as numpy arrays."""
        return self.fetch(self.dispatch(inputs, apply_penalties=apply_penalties,
                                        with_logprobs=with_logprobs, draw=draw))

    def dispatch(self, inputs: StepInputs, *, apply_penalties: bool, with_logprobs: bool = False,
                 draw: str = "filtered") -> SampleOutput:
        """Enqueues one step; returns its sampler output as device arrays, without waiting.

        `draw`: `sampling_params.draw_kind` of the batch ("filtered" is right for any batch)."""
        bucket = inputs.token_ids.shape[0]
        num_seqs = int(inputs.attention.num_seqs[0])
        decode_only = num_seqs > 0 and int(inputs.attention.cu_q_lens[num_seqs]) == num_seqs
        forward_program = self._decode_programs.get(bucket) if decode_only else None
        if forward_program is None:
            forward_program = self._forward_programs[bucket]
        forward_buffer, sampling_buffer = self.device_inputs(inputs)
        logits, self._hidden, self.kv_pages = forward_program(
            self.params, self.kv_pages, forward_buffer, self._last_token_ids)
        slots = logits.shape[0]
        sample_program = self._sample_programs[apply_penalties, with_logprobs, draw, slots]
        out = sample_program(logits, sampling_buffer)
        self._last_token_ids = out.token_ids
        return out

    def device_inputs(self, inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        """The step's forward arrays and its sampling tensors, each packed into one buffer and
        copied to the device, both before the forward is launched, so the sampler's inputs are
        there when the forward ends (its arrays used to be copied only after the launch)."""
        return jax.device_put((pack(forward_arrays(inputs))[0], pack(inputs.sampling)[0]),
                              self.plan.replicated)

    @staticmethod
    def fetch(out: SampleOutput) -> SampleOutput:
        """Waits for a dispatched step; its sampler output as numpy arrays."""
        return SampleOutput(*jax.device_get(tuple(out)))

    def prompt_logprobs(self, rows: np.ndarray, target_ids: np.ndarray):
        """Log-probs of `target_ids` [N] at token `rows` [N] of the last `execute`d step.

        Returns numpy (target logprobs [N], top ids [N, MAX_LOGPROBS], top logprobs [N, MAX_LOGPROBS]).
        Only steps that score prompts pay for this: the hidden states come to the host once and
        go back in fixed slices of `prompt_logprob_rows`, so no new shape is ever compiled. All
        slices are launched before any result is fetched.
        """
        hidden = np.asarray(jax.device_get(self._hidden))  # [T, D]
        r, n = self.prompt_logprob_rows, len(rows)
        padded = -(-n // r) * r
        rows = np.pad(rows, (0, padded - n))  # padding rows score row 0 and are cut off below
        target_ids = np.pad(target_ids, (0, padded - n))
        outs = [self._token_logprobs_program(self.params, hidden[rows[i:i + r]], target_ids[i:i + r])
                for i in range(0, padded, r)]
        return tuple(np.concatenate(parts)[:n] for parts in zip(*jax.device_get(outs)))

    def warmup(self) -> tuple[int, float]:
        """Compiles one forward program per token bucket (and a decode-only one for each of
        `decode_buckets`), the sampler variants for each bucket's number of sequence slots and
        the prompt-logprob scorer.

        Programs are compiled ahead of time and called directly, so serving can never trigger a
        compile: a wrong shape would be an error, not a silent recompile. Lowering is Python and
        runs in turn; XLA compiles in parallel threads. Returns (programs compiled, seconds).
        """
        start = time.perf_counter()
        lowered = {}
        for bucket in self.token_buckets:
            buffer, layout = pack(forward_arrays(self._dummy_inputs(bucket, apply_penalties=False)))
            for kind, forward in (("forward", self._forward), ("decode", self._forward_decode)):
                if kind == "decode" and bucket not in self.decode_buckets:
                    continue
                lowered[(kind, bucket)] = forward.lower(
                    self.params, self.kv_pages, buffer, self._last_token_ids, layout)
        rep = self.plan.replicated
        for bucket in self.token_buckets:
            slots = self.seq_slots(bucket)
            logits = jax.ShapeDtypeStruct((slots, self.config.vocab_size), jnp.float32, sharding=rep)
            for apply_penalties, with_logprobs, draw in SAMPLER_VARIANTS:
                key = ("sample", apply_penalties, with_logprobs, draw, slots)
                if key in lowered:
                    continue
                buffer, layout = pack(self._dummy_inputs(bucket, apply_penalties).sampling)
                buffer = jax.ShapeDtypeStruct(buffer.shape, buffer.dtype, sharding=rep)
                lowered[key] = self._sample.lower(
                    logits, buffer, layout=layout, apply_penalties=apply_penalties,
                    num_top_logprobs=MAX_LOGPROBS if with_logprobs else None, draw=draw)
        hidden = jax.ShapeDtypeStruct((self.prompt_logprob_rows, self.config.hidden_size),
                                      self.params["embed"].dtype, sharding=rep)
        targets = jax.ShapeDtypeStruct((self.prompt_logprob_rows,), jnp.int32, sharding=rep)
        lowered[("token_logprobs",)] = self._token_logprobs.lower(
            self.params, hidden, targets, num_top=MAX_LOGPROBS)
        self.lowering_seconds = time.perf_counter() - start

        def compile_timed(key):
            begin = time.perf_counter()
            options = None
            if key[0] in ("forward", "decode"):
                options = fp8_compiler_options(self.quantization, self.platform, rows=key[1])
            return lowered[key].compile(compiler_options=options), time.perf_counter() - begin

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = dict(zip(lowered, pool.map(compile_timed, lowered)))
        compiled = {key: program for key, (program, _) in results.items()}
        # Wall seconds of each compile (they overlap in the pool): where start-up goes.
        self.compile_seconds = {"/".join(map(str, key)): seconds for key, (_, seconds) in results.items()}
        self._forward_programs = {b: compiled[("forward", b)] for b in self.token_buckets}
        self._decode_programs = {b: compiled[("decode", b)] for b in self.decode_buckets}
        self._sample_programs = {key[1:]: program for key, program in compiled.items()
                                 if key[0] == "sample"}
        self._token_logprobs_program = compiled[("token_logprobs",)]
        return len(compiled), time.perf_counter() - start

    def _dummy_inputs(self, bucket: int, apply_penalties: bool) -> StepInputs:
        return build_step_inputs([], [], token_bucket=bucket, max_num_seqs=self.seq_slots(bucket),
                                 pages_per_seq=self.pages_per_seq,
                                 history_width=self.history_width(apply_penalties))


def unpack(buffer: jax.Array, layout: Layout) -> list[jax.Array]:
    """Cuts a `step_inputs.pack`ed int32 buffer back into its arrays (slices and bitcasts)."""
    sizes = [int(np.prod(shape)) for shape, _ in layout]
    if sum(sizes) != buffer.shape[0]:
        raise ValueError(f"a packed buffer of {buffer.shape[0]} values for a layout of "
                         f"{sum(sizes)}")
    arrays, offset = [], 0
    for (shape, dtype), size in zip(layout, sizes):
        piece = buffer[offset:offset + size].reshape(shape)
        arrays.append(piece if np.dtype(dtype) == np.int32
                      else jax.lax.bitcast_convert_type(piece, np.dtype(dtype)))
        offset += size
    return arrays


def _packed_forward_step(params, kv_pages, buffer, last_token_ids, layout: Layout, **kwargs):
    """`_forward_step` on its arrays sent as one buffer (`step_inputs.forward_arrays` order)."""
    token_ids, token_src, *metadata = unpack(buffer, layout)
    return _forward_step(params, kv_pages, token_ids, token_src, last_token_ids,
                         AttentionMetadata(*metadata), **kwargs)


def _forward_step(params, kv_pages, token_ids, token_src, last_token_ids, metadata, *, config,
                  attention, fp8_ops: Fp8Ops = Fp8Ops()):
    """The forward pass, first taking each token with `token_src >= 0` from the previous step's
    sampled ids (`last_token_ids` [S], still on the device)."""
    from_last = last_token_ids[jnp.maximum(token_src, 0)]
    token_ids = jnp.where(token_src >= 0, from_last, token_ids)
    return forward(params, kv_pages, token_ids, metadata, config=config, attention=attention,
                   fp8_ops=fp8_ops)


def pick_fp8_ops(platform: str, config: ModelConfig, tensor_parallel_size: int) -> Fp8Ops:
    """The row-wise ops between FP8 GEMMs (used where activations are e4m3): on an NVIDIA GPU
    the Pallas kernels of `pallas_kernels.fp8_activations`, each one pass over its rows where XLA
    makes two or three (an 8B prefill step on the H100: the SwiGLU 707 -> 319 us a layer); the
    jnp references elsewhere, and for widths the kernels do not take. Under tensor parallelism
    the MLP's width is split over devices and a row's max needs them all, which XLA's
    partitioner adds to the jnp ops and cannot add to a kernel: the references there too."""
    if platform != "gpu" or tensor_parallel_size != 1:
        return Fp8Ops()
    ok = fp8_kernels.supported
    attention_width = config.num_q_heads * config.head_dim
    return Fp8Ops(
        quantize=(fp8_kernels.quantize_fp8_gpu if ok(attention_width) and ok(config.hidden_size)
                  else fp8_kernels.quantize_rows),
        swiglu=(fp8_kernels.swiglu_fp8_gpu if ok(config.intermediate_size)
                else fp8_kernels.swiglu_fp8_reference),
        add_rms_norm=(fp8_kernels.add_rms_norm_fp8_gpu if ok(config.hidden_size)
                      else fp8_kernels.add_rms_norm_fp8_reference))


def _sample_step(logits, buffer, *, layout: Layout, num_rows, apply_penalties, num_top_logprobs,
                 draw="filtered"):
    """The sampler on a step's [slots, V] logits and its `SamplingTensors` packed in `buffer`;
    the sampled ids padded to `num_rows` (the engine's `max_num_seqs`), so the next step's
    forward reads them whatever this step's size."""
    sampling = SamplingTensors(*unpack(buffer, layout))
    out = sample(logits, sampling, apply_penalties=apply_penalties,
                 num_top_logprobs=num_top_logprobs, draw=draw)
    return out._replace(token_ids=jnp.pad(out.token_ids, (0, num_rows - out.token_ids.shape[0])))


def kv_bytes_per_page(config: ModelConfig, page_size: int, itemsize: int,
                      tensor_parallel_size: int = 1) -> int:
    """Bytes one page takes on each device (the cache is split over KV heads)."""
    heads = config.num_kv_heads // tensor_parallel_size
    return config.num_layers * page_size * 2 * heads * config.head_dim * itemsize


def device_kv_budget(params: dict, utilization: float) -> int | None:
    """Bytes left for the KV cache on the accelerator, or None where the device can't say (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    # Keep a slice back for the compiled programs' activations and workspace.
    reserve = max(int(0.05 * stats["bytes_limit"]), 1 << 30)
    return int(stats["bytes_limit"] * utilization) - stats.get("bytes_in_use", 0) - reserve
