"""The engine's Pallas attention path against its reference path, end to end.

On CPU the Pallas backend is the GPU kernel in interpret mode; on a GPU (device tool, marked
`gpu`) it is the compiled Triton kernel. Greedy decoding must give the same tokens as the
reference backend for the same model and prompts; a 32-token budget forces chunked prefill and
mixed prefill + decode steps, and 3 q heads per kv head exercise the padded GQA group.
"""

import pytest

from jaxpaged import LLM
from jaxpaged.attention import resolve_backend
from jaxpaged.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    " * 6, "1, 2, 3, 4,"]  # the 2nd: > 32 tokens
ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_pages=24, token_buckets=(32,))


def greedy_tokens(llm, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("auto", "gpu") == "pallas"
    assert resolve_backend("auto", "tpu") == "pallas"
    assert resolve_backend("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("flash", "cpu")


@pytest.mark.slow
def test_engine_pallas_matches_reference_greedy():
    want = greedy_tokens(LLM(attention_backend="reference", **ENGINE), 6)
    got = greedy_tokens(LLM(attention_backend="pallas", **ENGINE), 6)
    assert got == want


def random_smollm2_dir(tmp_path_factory):
    """SmolLM2-135M's config and tokenizer with random weights (the GGUF is too big to carry to
    the device). $JAXPAGED_SMOLLM2_CONFIG_DIR names a dir with config.json + tokenizer files."""
    import os
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = os.environ.get("JAXPAGED_SMOLLM2_CONFIG_DIR")
    if source is None:
        from jaxpaged.model_source import resolve_model

        source = resolve_model(None)._config_dir()
    target = tmp_path_factory.mktemp("random_smollm2")
    for f in Path(source).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.float32)
    model.save_pretrained(target)
    return str(target)


@pytest.mark.gpu
def test_engine_pallas_matches_reference_greedy_on_gpu(tmp_path_factory):
    # float32 with "highest" matmuls on both sides (JAX_DEFAULT_MATMUL_PRECISION=highest), so the
    # only difference is the order of the sums; random weights keep the GGUF off the device.
    model = random_smollm2_dir(tmp_path_factory)
    engine = dict(ENGINE, max_model_len=256, num_pages=64)
    want = greedy_tokens(LLM(model, attention_backend="reference", **engine), 24)
    got = greedy_tokens(LLM(model, attention_backend="pallas", **engine), 24)
    assert got == want
