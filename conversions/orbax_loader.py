"""Loads a `jaxpaged convert` checkpoint straight into sharded arrays (device side).

When the sharding plan needs no padding (TP divides the KV heads and the MLP width, the usual
case), orbax restores every leaf directly with its target NamedSharding and dtype: each device
reads only its own slice from disk. When the plan pads or replicates heads (e.g. SmolLM2's 3 KV
heads at TP=2), leaves are restored to host numpy, padded there and placed one slice per device,
as `load_params` does for HF checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from conversions.convert import CONVERTER_VERSION, FORMAT, METADATA_FILE, PARAMS_DIR
from jaxpaged.config import ModelConfig
from jaxpaged.models.params import _is_spec, param_specs
from jaxpaged.sharding import ShardingPlan


def read_metadata(path: str | Path) -> dict:
    file = Path(path) / METADATA_FILE
    metadata = json.loads(file.read_text())
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} checkpoint (format {metadata.get('format')!r})")
    return metadata


def restore_params(path: str | Path, config: ModelConfig, dtype, plan: ShardingPlan | None = None) -> dict:
    import orbax.checkpoint as ocp

    metadata = read_metadata(path)
    if metadata.get("converter_version") != CONVERTER_VERSION:
        raise ValueError(f"{path} was converted by another jaxpaged version (converter "
                         f"{metadata.get('converter_version')}, this one reads "
                         f"{CONVERTER_VERSION}); re-run jaxpaged convert")
    plan = plan or ShardingPlan.build(config)
    params_dir = (Path(path) / PARAMS_DIR).resolve()
    specs = param_specs(config)
    _check_shapes(params_dir, specs)
    if plan.config == plan.source_config:
        target = jax.tree.map(
            lambda spec: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=plan.sharding(spec.logical_axes)),
            specs, is_leaf=_is_spec)
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, target)
    host = ocp.PyTreeCheckpointer().restore(
        params_dir, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                              specs, is_leaf=_is_spec))
    return jax.tree.map(
        lambda spec, array: plan.put(plan.pad(array, spec.logical_axes), spec.logical_axes, dtype),
        specs, host, is_leaf=_is_spec)


def _check_shapes(params_dir: Path, specs: dict) -> None:
    """The checkpoint must hold exactly the declared leaves and shapes (one clear error if not)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(params_dir).item_metadata.tree
    try:
        pairs = jax.tree.leaves(jax.tree.map(lambda spec, meta: (spec, tuple(meta.shape)), specs,
                                             saved, is_leaf=_is_spec), is_leaf=lambda x: isinstance(x, tuple))
    except ValueError:
        raise ValueError(f"{params_dir} does not hold the params this model config declares "
                         "(different layers or tensors); re-run jaxpaged convert") from None
    for spec, shape in pairs:
        if shape != spec.shape:
            raise ValueError(f"{params_dir}: {' + '.join(spec.hf_names)} has shape {shape}, expected "
                             f"{spec.shape}; re-run jaxpaged convert")
