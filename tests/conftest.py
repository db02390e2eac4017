"""Shared fixtures. The real model (SmolLM2-135M-Instruct) is fetched once into the cache."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import jax

    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run through the device tool)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path():
    from jaxpaged.model_source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader: the independent oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    kwargs = dict(gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, **kwargs)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_llm():
    """A small engine: a 64-token budget forces chunked prefill, 12 pages force preemption, and
    the 4-token bucket has 4 sequence slots where the others have 8, so a step may read pending
    tokens from the ids of a step with more slots."""
    from jaxpaged import LLM

    return LLM(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
               num_pages=12, token_buckets=(4, 16, 64))
