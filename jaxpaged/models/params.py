"""Parameter declarations and loading.

Every leaf is declared once — shape, logical axes, and the Hugging Face tensor it comes from —
and loading, random init and sharding all derive from that declaration (the logical axes go
through the rules table in `jaxpaged.sharding`). Params are plain
pytrees: {"embed", "layers": [dict per layer], "final_norm", optional "lm_head"}. Linear weights
are stored [in, out] so the forward pass reads `x @ w`; HF stores [out, in], so they load transposed.
The MLP's gate and up projections are one leaf, [in, 2, out] (gate, then up), so one matmul
reads both: one kernel a layer fewer in a decode step. The stacked axis sits before the sharded
one, so tensor parallelism splits both halves alike. Likewise q, k and v are one leaf,
[in, Hkv * (G + 2) * head_dim]: for each KV head its G query heads, then its key, then its value
(`join_qkv`), so tensor parallelism's equal column blocks give each device whole KV heads with
their query groups. With three leaves XLA merged the three matmuls itself and concatenated the
weights again in every step (an 8B model on the H100: 33 us a layer of a prefill step; its
decode steps read the three weights through a slower Triton GEMM).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.config import ModelConfig
from jaxpaged.models.quant import QUANTIZED_LEAVES, quantize_params, quantized_axes
from jaxpaged.sharding import ShardingPlan


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    hf_name: str | tuple[str, ...]  # a tuple: HF tensors joined into the leaf (`join`), in order
    transpose: bool = False  # HF [out, in] -> ours [in, out]
    # (Hq, Hkv, head_dim): the HF tensors are q, k and v, joined on the last axis by `join_qkv`
    qkv_heads: tuple[int, int, int] | None = None

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.hf_name if isinstance(self.hf_name, tuple) else (self.hf_name,)

    def hf_shape_of(self, name: str) -> tuple[int, ...]:
        """The shape HF tensor `name` of this leaf has."""
        shape = self.shape
        if self.qkv_heads is not None:
            hq, hkv, hd = self.qkv_heads
            width = hq * hd if self.hf_names.index(name) == 0 else hkv * hd
            shape = shape[:-1] + (width,)
        elif isinstance(self.hf_name, tuple):
            shape = shape[:1] + shape[2:]
        return shape[::-1] if self.transpose else shape

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        """The leaf from its HF tensors' arrays (already in our orientation), in `hf_names` order."""
        if self.qkv_heads is not None:
            return join_qkv(*parts, num_kv_heads=self.qkv_heads[1], head_dim=self.qkv_heads[2])
        return np.stack(parts, axis=1)


def join_qkv(q, k, v, *, num_kv_heads: int, head_dim: int):
    """q [..., Hq * hd], k and v [..., Hkv * hd] -> [..., Hkv * (G + 2) * hd]: for each KV head,
    its G = Hq / Hkv query heads, then its key, then its value (the fused q/k/v leaf's columns)."""
    lead = q.shape[:-1]
    q, k, v = (a.reshape(*lead, num_kv_heads, -1, head_dim) for a in (q, k, v))
    return np.concatenate([q, k, v], axis=-2).reshape(*lead, -1)


def split_qkv(qkv, *, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """The inverse of `join_qkv` for rows: [T, Hkv * (G + 2) * hd] -> q [T, Hq, hd], k and v
    [T, Hkv, hd]."""
    num_tokens, group = qkv.shape[0], num_q_heads // num_kv_heads
    qkv = qkv.reshape(num_tokens, num_kv_heads, group + 2, head_dim)
    return (qkv[:, :, :group].reshape(num_tokens, num_q_heads, head_dim),
            qkv[:, :, group], qkv[:, :, group + 1])


class LeafAssembler:
    """Builds params leaves from (HF name, array) pairs in any order: checks each tensor's shape,
    transposes it to ours and stacks the parts of a stacked leaf. `add` returns (leaf index,
    array) once a leaf is complete; tensors the model does not use return None."""

    def __init__(self, leaves: list[ParamSpec], error=ValueError):
        self.leaves, self.error = leaves, error
        self.by_name = {name: (i, j) for i, spec in enumerate(leaves)
                        for j, name in enumerate(spec.hf_names)}
        self.parts: dict[int, dict[int, np.ndarray]] = {}
        self.done: set[int] = set()

    def spec_of(self, name: str) -> ParamSpec | None:
        """The leaf that tensor `name` is (part of); None if the model does not use it."""
        return self.leaves[self.by_name[name][0]] if name in self.by_name else None

    def add(self, name: str, array: np.ndarray) -> tuple[int, np.ndarray] | None:
        if name not in self.by_name:
            return None
        i, j = self.by_name[name]
        spec = self.leaves[i]
        if array.shape != spec.hf_shape_of(name):
            raise self.error(f"tensor {name} has shape {tuple(array.shape)}, expected "
                             f"{spec.hf_shape_of(name)} from the config")
        array = array.T if spec.transpose else array
        if not isinstance(spec.hf_name, tuple):
            self.done.add(i)
            return i, array
        parts = self.parts.setdefault(i, {})
        parts[j] = array
        if len(parts) < len(spec.hf_names):
            return None
        del self.parts[i]
        self.done.add(i)
        return i, spec.join([parts[k] for k in range(len(parts))])

    def check_complete(self, what: str = "the checkpoint") -> None:
        missing = [name for i, spec in enumerate(self.leaves) if i not in self.done
                   for j, name in enumerate(spec.hf_names) if j not in self.parts.get(i, {})]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise self.error(f"{what} is missing tensors the model needs: {shown}")


def param_specs(config: ModelConfig) -> dict:
    """The params pytree with a ParamSpec at every leaf."""
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.num_q_heads * hd, config.num_kv_heads * hd
    qkv_dim, heads = q_dim + 2 * kv_dim, (config.num_q_heads, config.num_kv_heads, hd)

    def linear(name, n_in, n_out, axes):
        return ParamSpec((n_in, n_out), axes, f"{name}.weight", transpose=True)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."

        def qkv_names(suffix):
            return tuple(f"{p}self_attn.{x}_{suffix}" for x in "qkv")

        layer = {
            "input_norm": ParamSpec((d,), ("embed",), p + "input_layernorm.weight"),
            "qkv_proj": ParamSpec((d, qkv_dim), ("embed", "qkv_heads"), qkv_names("proj.weight"),
                                  transpose=True, qkv_heads=heads),
            "o_proj": linear(p + "self_attn.o_proj", q_dim, d, ("q_heads", "embed")),
            "post_norm": ParamSpec((d,), ("embed",), p + "post_attention_layernorm.weight"),
            "gate_up_proj": ParamSpec((d, 2, f), ("embed", None, "mlp"),
                                      (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                                      transpose=True),
            "down_proj": linear(p + "mlp.down_proj", f, d, ("mlp", "embed")),
        }
        if config.qkv_bias:
            layer["qkv_bias"] = ParamSpec((qkv_dim,), ("qkv_heads",), qkv_names("proj.bias"),
                                          qkv_heads=heads)
        if config.qk_norm:
            layer["q_norm"] = ParamSpec((hd,), (None,), p + "self_attn.q_norm.weight")
            layer["k_norm"] = ParamSpec((hd,), (None,), p + "self_attn.k_norm.weight")
        layers.append(layer)

    specs = {
        "embed": ParamSpec((config.vocab_size, d), ("vocab", "embed"), "model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": ParamSpec((d,), ("embed",), "model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = linear("lm_head", d, config.vocab_size, ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shardings(plan: ShardingPlan, quantization: str | None = None) -> dict:
    """The NamedSharding of every leaf, from its logical axes (over the plan's padded shapes);
    with `quantization`, of the tree `quant.quantize_params` makes."""
    specs = param_specs(plan.config)
    if quantization:
        for layer in specs["layers"]:
            for name in QUANTIZED_LEAVES:
                layer[name] = quantized_axes(layer[name].logical_axes)
    return jax.tree.map(lambda spec: plan.sharding(spec.logical_axes if _is_spec(spec) else spec),
                        specs, is_leaf=lambda x: _is_spec(x) or isinstance(x, tuple))


def load_params(config: ModelConfig, weights: Iterable[tuple[str, np.ndarray]], dtype,
                plan: ShardingPlan | None = None) -> dict:
    """Builds the params pytree from (HF name, array) pairs, checking every shape.

    Tensors the model does not use (e.g. rotary caches, a tied lm_head copy) are skipped. Each
    tensor is padded to the plan's layout on the host and placed one slice per device (no plan:
    one device).
    """
    plan = plan or ShardingPlan.build(config)
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    assembler = LeafAssembler(leaves)
    loaded: list = [None] * len(leaves)
    for name, array in weights:
        leaf = assembler.add(name, np.asarray(array))
        if leaf is not None:
            i, array = leaf
            spec = leaves[i]
            loaded[i] = plan.put(plan.pad(array, spec.logical_axes), spec.logical_axes, dtype)
    assembler.check_complete()
    return jax.tree.unflatten(treedef, loaded)


def random_params(config: ModelConfig, dtype, seed: int = 0, plan: ShardingPlan | None = None,
                  quantization: str | None = None) -> dict:
    """Random weights of the right shapes (for benchmarks without downloads), quantized by
    `quantization` if given (`quant.quantize_params`).

    Each leaf is drawn inside a jit whose output is already sharded, so no device holds a whole
    sharded tensor. Random bits are partitionable (jax_threefry_partitionable), so the values do
    not depend on the plan: TP=1 and TP=2 get the same model.
    """
    plan = plan or ShardingPlan.build(config)
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    programs: dict = {}  # one compiled draw per distinct leaf kind (layers repeat them)
    values = []
    for key, spec in zip(keys, leaves):
        norm = len(spec.shape) == 1 and spec.hf_names[0].endswith("norm.weight")
        kind = (spec.shape, spec.logical_axes, norm)
        if kind not in programs:
            def draw(key, spec=spec, norm=norm):
                value = (jnp.ones(spec.shape, jnp.float32) if norm
                         else 0.02 * jax.random.normal(key, spec.shape, jnp.float32))
                return plan.pad(value.astype(dtype), spec.logical_axes, xp=jnp)

            programs[kind] = jax.jit(draw, out_shardings=plan.sharding(spec.logical_axes))
        values.append(programs[kind](key))
    params = jax.tree.unflatten(treedef, values)
    if quantization:
        params = quantize_params(params, param_shardings(plan, quantization), quantization)
    return params

