"""The model and engine configs: small, frozen, validated with messages a user can act on.

Host-side: no JAX here.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_BACKENDS = ("auto", "reference", "pallas")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights of the model's shapes, made on device
# vLLM's names -> the cache's dtype name ("auto": the model dtype's; "fp8" is e4m3)
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
QUANTIZATIONS = ("fp8",)  # what jaxpaged.models.quant implements

# transformers' class defaults for the config.json fields `from_hf_config` reads, per family: a
# config.json may leave any of them out, and transformers fills them from its config class. The
# engine reads config.json itself (importing transformers, and with it torch, costs seconds of
# start-up); tests/test_models.py checks this table against transformers' configs.
_COMMON_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                        num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                        tie_word_embeddings=False)
_QWEN_DEFAULTS = dict(_COMMON_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                      num_key_value_heads=32, max_position_embeddings=32768)
HF_CONFIG_DEFAULTS = {
    "llama": dict(_COMMON_DEFAULTS, intermediate_size=11008, max_position_embeddings=2048),
    "mistral": dict(_COMMON_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": dict(_QWEN_DEFAULTS, head_dim=128),
}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the forward pass needs, read from a Hugging Face config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; hashable
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in

    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelConfig":
        """Reads a transformers PretrainedConfig, or a plain dict from config.json (fields it
        leaves out take transformers' defaults for its family)."""
        if isinstance(hf, dict):
            hf = {**HF_CONFIG_DEFAULTS.get(hf.get("model_type"), {}), **hf}
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}; jaxpaged supports: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_q_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_q_heads
        # transformers 5 keeps rope settings in `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling`.
        rope = dict(get("rope_parameters") or {})
        legacy = get("rope_scaling") or {}
        if not rope:
            rope = dict(legacy)
        rope_theta = float(rope.pop("rope_theta", None) or get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_scaling = () if rope_type == "default" else (("rope_type", rope_type),) + tuple(
            sorted((k, v) for k, v in rope.items() if isinstance(v, (int, float, str)))
        )
        # Options these families allow but jaxpaged does not implement: refuse rather than load a
        # model that would silently compute something else.
        quantization = get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
            raise ValueError(f"quantized checkpoints ({method}) are not supported; use a float16, "
                             "bfloat16 or float32 checkpoint, or a GGUF file")
        if get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported (no released Llama-family model uses it)")
        if get("attention_bias") and model_type != "qwen2":
            raise ValueError(f"attention_bias=True is not supported for {model_type} "
                             "(only Qwen2's q/k/v biases are)")
        if model_type == "qwen2" and get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
        use_sliding = get("use_sliding_window", model_type == "mistral")
        sliding_window = get("sliding_window") if use_sliding else None
        dtype = get("dtype") or (hf.get("torch_dtype") if isinstance(hf, dict) else None) or "float32"
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_q_heads=num_q_heads,
            num_kv_heads=get("num_key_value_heads") or num_q_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            torch_dtype=str(dtype).replace("torch.", ""),
        )

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_q_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs, named like vLLM's so users can switch."""

    model: str | None = None  # None: the embedded default, SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on accelerators
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    page_size: int | None = None  # tokens per KV page; None: `resolved_page_size`
    num_pages: int | None = None  # None: sized from the memory budget
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (wins over utilization)
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1  # devices the model and KV cache are sharded over
    seed: int = 0
    enable_prefix_caching: bool = True
    # Schedule step N+1 while step N runs on the device (vLLM's --async-scheduling). None: on for
    # GPU and TPU; off on CPU, where the "device" is the same cores the host work would compete for.
    async_scheduling: bool | None = None
    token_buckets: tuple[int, ...] | None = None  # None: powers of two up to the token budget
    load_format: str = "auto"
    # "fp8": linear weights quantized to e4m3 per output channel as they load, activations per
    # token in the step (jaxpaged.models.quant); None: the model dtype throughout.
    quantization: str | None = None
    # The KV cache's storage dtype. "auto": the model dtype; "fp8" (= "fp8_e4m3") or "fp8_e5m2":
    # one byte per value, so twice the pages in the same memory and half the bytes a decode step
    # reads. Values are rounded (saturating) as they are stored, with no scale (vLLM's default
    # of 1.0), and widened where attention reads them (pallas_kernels.reference.to_cache_dtype).
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size",
                     "num_pages", "kv_cache_memory_bytes", "tensor_parallel_size"):
            positive(name)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                             f"got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or unset), "
                             f"got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.page_size is not None and self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode"
            )
        if self.token_buckets is not None:
            if sorted(set(self.token_buckets)) != list(self.token_buckets) or not self.token_buckets:
                raise ValueError("token_buckets must be a non-empty increasing list")
            if self.token_buckets[-1] < self.max_num_batched_tokens:
                raise ValueError("the largest token bucket must be >= max_num_batched_tokens")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def resolved_token_buckets(self) -> tuple[int, ...]:
        """Few buckets: powers of two from 8 up to the token budget (which is always one). The
        smallest is where batch-1 decoding lands, and its rows are all computed: on the H100 an 8B
        batch-1 step took 5.67 ms in an 8-row bucket against 5.88 in a 16-row one (GEMMs, the
        attention grid and the row-wise kernels all shrink; benchmarks/results/h100_session17.md)."""
        if self.token_buckets is not None:
            return tuple(self.token_buckets)
        buckets, size = [], 8
        while size < self.max_num_batched_tokens:
            buckets.append(size)
            size *= 2
        return tuple(buckets) + (self.max_num_batched_tokens,)

    def resolved_page_size(self, platform: str) -> int:
        """`page_size`, or by platform: 64 on NVIDIA GPUs, where the decode kernel reads a page
        per load (on an H200, batch 256 x ctx 1024 took 0.277 ms at page 64, 0.292 at 32 and
        0.326 at 16; batch 32: 0.051, 0.050, 0.058: benchmarks/results/h200_session9.md); 16
        elsewhere (vLLM's default; finer prefix sharing)."""
        if self.page_size is not None:
            return self.page_size
        return 64 if platform == "gpu" else 16


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")
