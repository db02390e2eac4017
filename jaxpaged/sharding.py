"""Tensor parallelism: the device mesh, the one rules table, and how params and caches shard.

Model code names logical axes (`ParamSpec.logical_axes`); `RULES` maps them to mesh axes:
column-parallel q/k/v/gate/up (their output axis over "model"), row-parallel o/down (their input
axis over "model", XLA adds the all-reduce), vocab-parallel embedding and LM head. The KV cache
shards over KV heads, and attention runs under `jax.shard_map`, so each device runs the backend's
op on its own heads with no communication.

Nothing is assumed divisible by the tensor-parallel size (TP). A `ShardingPlan` fixes, at load
time, a *padded* model config that is:
- KV heads: when TP does not divide them, each KV head is replicated until the count is
  lcm(num_kv_heads, TP) (SmolLM2: 3 KV heads at TP=2 → 6), as vLLM does;
- q heads: each replica of a KV head serves a contiguous slice of that head's query group; a
  group that does not split evenly is padded with all-zero query heads (zero q/o weights, so they
  add exactly nothing to the output);
- MLP width: zero-padded up to a multiple of TP (silu(0) * 0 = 0 and the down rows are zero);
- vocabulary: replicated (not padded) when TP does not divide it, so logits never gain fake
  entries; it costs the LM head's memory on every device.
What was padded or replicated is listed in `ShardingPlan.notes` (the engine logs it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxpaged.config import ModelConfig

DATA, MODEL = "data", "model"

# The one rules table: logical axis → mesh axis (None: replicated). Every logical axis a ParamSpec
# uses must appear here, so a new axis cannot silently end up replicated.
RULES: dict[str, str | None] = {
    "vocab": MODEL,  # vocab-parallel embedding and LM head
    "embed": None,  # the residual stream stays whole on every device
    "q_heads": MODEL,  # column-parallel q (and row-parallel o)
    "kv_heads": MODEL,  # the KV cache's head axis
    "qkv_heads": MODEL,  # column-parallel fused q/k/v (whole KV heads with their query groups)
    "mlp": MODEL,  # column-parallel gate/up, row-parallel down
}

# The cache layout's axes (pallas_kernels.get_kv_cache_shape: [pages, page_size, 2 * Hkv, D], K
# and V of a head adjacent): splitting axis 2 into TP equal blocks gives each device whole heads.
KV_PAGES_AXES = (None, None, "kv_heads", None)


def partition_spec(logical_axes: tuple[str | None, ...], rules: dict[str, str | None]) -> P:
    """PartitionSpec for one array, refusing a mesh axis used twice (a collision)."""
    unknown = [a for a in logical_axes if a is not None and a not in rules]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no entry in the sharding rules")
    mesh_axes = [rules[a] if a is not None else None for a in logical_axes]
    used = [m for m in mesh_axes if m is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {logical_axes} map mesh axis {used} more than once")
    return P(*mesh_axes)


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A (data=1, model=TP) mesh over the first TP devices.

    Axis types are Auto on purpose: the model code carries no sharding annotations, and Auto lets
    XLA propagate shardings from the params and the fixed jit in/out shardings through the matmuls
    (inserting the row-parallel all-reduces), while attention is pinned per device by shard_map.
    Explicit axes would make every reshape and the embedding gather state its output sharding in
    the model code, which is exactly what the one rules table is there to keep out of it.
    The data axis (size 1) names where data-parallel replicas on one host would go.
    """
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but only {len(devices)} "
                         f"{devices[0].platform} device(s) are visible")
    return jax.make_mesh((1, tensor_parallel_size), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:tensor_parallel_size])


@dataclass(frozen=True)
class ShardingPlan:
    mesh: Mesh
    source_config: ModelConfig  # the checkpoint's architecture
    config: ModelConfig  # the padded architecture the forward pass and caches use
    q_head_sources: tuple[int, ...]  # per padded q head: the checkpoint's head, or -1 (zeros)
    kv_head_sources: tuple[int, ...]  # per padded KV head: the checkpoint's KV head
    rules: dict
    notes: tuple[str, ...]  # what was padded or replicated, for the log

    @classmethod
    def build(cls, config: ModelConfig, tensor_parallel_size: int = 1, devices=None) -> "ShardingPlan":
        tp = tensor_parallel_size
        mesh = make_mesh(tp, devices)
        hq, hkv = config.num_q_heads, config.num_kv_heads
        q_sources, kv_sources = head_layout(hq, hkv, tp)
        notes = []
        if len(kv_sources) != hkv:
            notes.append(f"{hkv} KV heads replicated x{len(kv_sources) // hkv} to "
                         f"{len(kv_sources)} (TP={tp})")
        if len(q_sources) != hq:
            notes.append(f"{hq} query heads padded with {len(q_sources) - hq} zero heads "
                         f"to {len(q_sources)}")
        mlp = -(-config.intermediate_size // tp) * tp
        if mlp != config.intermediate_size:
            notes.append(f"MLP width {config.intermediate_size} zero-padded to {mlp}")
        rules = dict(RULES)
        if config.vocab_size % tp:
            rules["vocab"] = None
            notes.append(f"vocabulary {config.vocab_size} not divisible by TP={tp}: embedding "
                         "and LM head replicated")
        padded = dataclasses.replace(config, num_q_heads=len(q_sources),
                                     num_kv_heads=len(kv_sources), intermediate_size=mlp)
        return cls(mesh, config, padded, q_sources, kv_sources, rules, tuple(notes))

    @property
    def tensor_parallel_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(logical_axes, self.rules))

    @property
    def qkv_head_sources(self) -> tuple[int, ...]:
        """Per head-sized column block of the padded fused q/k/v leaf (`params.join_qkv`: each KV
        head's query group, its key, its value), the source leaf's block, or -1 (zeros)."""
        group = self.source_config.num_q_heads // self.source_config.num_kv_heads
        padded_group = self.config.num_q_heads // self.config.num_kv_heads
        sources = []
        for j, kv in enumerate(self.kv_head_sources):
            for q in self.q_head_sources[j * padded_group:(j + 1) * padded_group]:
                sources.append(q // group * (group + 2) + q % group if q >= 0 else -1)
            sources += [kv * (group + 2) + group, kv * (group + 2) + group + 1]
        return tuple(sources)

    @property
    def kv_pages_sharding(self) -> NamedSharding:
        return self.sharding(KV_PAGES_AXES)

    def pad(self, array, logical_axes: tuple[str | None, ...], xp=np):
        """Maps a checkpoint-shaped array onto the padded layout (xp: numpy, or jax.numpy in jit)."""
        hd = self.config.head_dim
        for axis, name in enumerate(logical_axes):
            if name == "q_heads":
                array = _select_heads(array, axis, self.q_head_sources, hd, xp)
            elif name == "kv_heads":
                array = _select_heads(array, axis, self.kv_head_sources, hd, xp)
            elif name == "qkv_heads":
                array = _select_heads(array, axis, self.qkv_head_sources, hd, xp)
            elif name == "mlp" and array.shape[axis] != self.config.intermediate_size:
                widths = [(0, 0)] * array.ndim
                widths[axis] = (0, self.config.intermediate_size - array.shape[axis])
                array = xp.pad(array, widths)
        return array

    def put(self, array: np.ndarray, logical_axes: tuple[str | None, ...], dtype) -> jax.Array:
        """Places a host array (already padded) as a sharded jax.Array, one slice per device, so no
        device ever holds the whole of a sharded tensor. The cast to `dtype` happens per slice."""
        np_dtype = np.dtype(dtype)

        def block(index):
            piece = array[index]
            if piece.dtype == np.float16:  # via float32: ml_dtypes has no direct f16→bf16 cast path
                piece = piece.astype(np.float32)
            return np.ascontiguousarray(piece.astype(np_dtype))

        return jax.make_array_from_callback(array.shape, self.sharding(logical_axes), block)

    def shard_attention(self, attention):
        """Runs attention(q, k, v, kv_pages, metadata, rope, counts) per device on that device's
        heads (the rope tables, like the metadata, whole on every device; the decode kernel's
        counters, one block per device).

        check_vma is off because backends are opaque ops (Pallas kernels carry no
        varying-manual-axes rules); the specs below state exactly what varies per device.
        """
        heads = P(None, MODEL, None)  # [T, H, D] split over heads
        pages = partition_spec(KV_PAGES_AXES, self.rules)
        sharded = jax.shard_map(
            lambda q, k, v, kv, metadata, rope, counts: attention(q, k, v, kv, metadata, rope=rope, counts=counts),
            mesh=self.mesh, in_specs=(heads, heads, heads, pages, P(), P(), P(MODEL)),
            out_specs=(heads, pages, P(MODEL)), check_vma=False)
        return lambda q, k, v, kv, metadata, rope=None, counts=None: sharded(q, k, v, kv, metadata, rope, counts)


def head_layout(num_q_heads: int, num_kv_heads: int, tp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(source of each padded q head or -1, source of each padded KV head) for TP devices.

    Heads split into TP contiguous blocks; padded q head j attends with padded KV head
    j // (Hq' / Hkv'), which holds the same KV head the source q head used (GQA preserved).
    """
    group = num_q_heads // num_kv_heads
    if num_kv_heads % tp == 0:
        return tuple(range(num_q_heads)), tuple(range(num_kv_heads))
    replicas = math.lcm(num_kv_heads, tp) // num_kv_heads
    per_replica = -(-group // replicas)  # query heads each KV replica serves
    kv_sources = tuple(h for h in range(num_kv_heads) for _ in range(replicas))
    q_sources = tuple(h * group + g if g < group else -1
                      for h in range(num_kv_heads) for r in range(replicas)
                      for g in range(r * per_replica, (r + 1) * per_replica))
    return q_sources, kv_sources


def _select_heads(array, axis: int, sources: tuple[int, ...], head_dim: int, xp):
    """Reorders/replicates head blocks of `head_dim` along `axis`; source -1 gives a zero head."""
    if sources == tuple(range(array.shape[axis] // head_dim)):
        return array  # the identity: no copy
    heads = np.array(sources)
    columns = (np.maximum(heads, 0)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    keep = np.repeat(heads >= 0, head_dim).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return xp.where(keep, xp.take(array, columns, axis=axis), xp.zeros((), array.dtype))
