"""Parameter declarations and loading.

Every leaf is declared once — shape, logical axes, and the Hugging Face tensor it comes from —
and loading, random init and sharding all derive from that declaration (the logical axes go
through the rules table in `jaxpaged.sharding`). Params are plain
pytrees: {"embed", "layers": [dict per layer], "final_norm", optional "lm_head"}. Linear weights
are stored [in, out] so the forward pass reads `x @ w`; HF stores [out, in], so they load transposed.
The MLP's gate and up projections are one leaf, [in, 2, out] (gate, then up), so one matmul
reads both: one kernel a layer fewer in a decode step. The stacked axis sits before the sharded
one, so tensor parallelism splits both halves alike.
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
    hf_name: str | tuple[str, ...]  # a tuple: HF tensors stacked on axis 1, in this order
    transpose: bool = False  # HF [out, in] -> ours [in, out]

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.hf_name if isinstance(self.hf_name, tuple) else (self.hf_name,)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape each HF tensor of this leaf has."""
        shape = self.shape
        if isinstance(self.hf_name, tuple):
            shape = shape[:1] + shape[2:]
        return shape[::-1] if self.transpose else shape


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
        if array.shape != spec.hf_shape:
            raise self.error(f"tensor {name} has shape {tuple(array.shape)}, expected "
                             f"{spec.hf_shape} from the config")
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
        return i, np.stack([parts[k] for k in range(len(parts))], axis=1)

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

    def linear(name, n_in, n_out, axes):
        return ParamSpec((n_in, n_out), axes, f"{name}.weight", transpose=True)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_norm": ParamSpec((d,), ("embed",), p + "input_layernorm.weight"),
            "q_proj": linear(p + "self_attn.q_proj", d, q_dim, ("embed", "q_heads")),
            "k_proj": linear(p + "self_attn.k_proj", d, kv_dim, ("embed", "kv_heads")),
            "v_proj": linear(p + "self_attn.v_proj", d, kv_dim, ("embed", "kv_heads")),
            "o_proj": linear(p + "self_attn.o_proj", q_dim, d, ("q_heads", "embed")),
            "post_norm": ParamSpec((d,), ("embed",), p + "post_attention_layernorm.weight"),
            "gate_up_proj": ParamSpec((d, 2, f), ("embed", None, "mlp"),
                                      (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                                      transpose=True),
            "down_proj": linear(p + "mlp.down_proj", f, d, ("mlp", "embed")),
        }
        if config.qkv_bias:
            for name, width, axis in (("q", q_dim, "q_heads"), ("k", kv_dim, "kv_heads"),
                                      ("v", kv_dim, "kv_heads")):
                layer[f"{name}_bias"] = ParamSpec((width,), (axis,), p + f"self_attn.{name}_proj.bias")
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

