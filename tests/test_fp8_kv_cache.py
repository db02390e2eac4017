"""kv_cache_dtype="fp8": the engine end to end against transformers with the same FP8 cache.

The oracle is transformers' own model whose cache rounds every key and value it stores to e4m3
(saturating, torch's conversion): attention then reads the rounded K/V, the current token's
included, which is what the engine's FP8 cache does. The kernels' FP8 paths are checked against
the reference op in test_gpu_kernel and test_tpu_kernel, the reference against a float64 oracle
in test_reference_attention.
"""

import numpy as np
import pytest
import torch
import transformers

import jaxpaged
from jaxpaged.config import EngineConfig
from test_models import (ENGINE_ARGS, PROMPT_LENS, VOCAB, cache_kwargs, family_config, run_engine,
                         save_checkpoint, transformers_logits)

NUM_DECODE_STEPS = 8


class Fp8Cache(transformers.DynamicCache):
    """transformers' cache, storing keys and values rounded to e4m3 (±448 saturated)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def rounded(x):
            return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)

        return super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp8_cache_matches_transformers_with_an_fp8_cache(family, tmp_path):
    model = save_checkpoint(tmp_path, family_config(family))
    llm = jaxpaged.LLM(model=str(tmp_path), kv_cache_dtype="fp8", **ENGINE_ARGS)
    assert all(pages.dtype == np.dtype("float8_e4m3fn") for pages in llm.engine.runner.kv_pages)

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
    for prompt, steps in zip(prompts, run_engine(llm, prompts, NUM_DECODE_STEPS)):
        ours = np.stack([logits for logits, _ in steps])
        tokens = [token for _, token in steps]
        want = transformers_logits(model, prompt + tokens, len(prompt), Fp8Cache())
        plain = transformers_logits(model, prompt + tokens, len(prompt))
        diff = np.abs(ours - want).max()
        # A key computed a rounding error apart can land on the other side of an e4m3 rounding
        # boundary (one step, 2^-3 relative): rare, and far below what FP8 itself changes.
        assert diff < 2e-3, f"{len(prompt)}-token prompt: logits differ by {diff:.2e}"
        assert np.abs(plain - want).max() > 20 * diff  # the cache really is FP8
        assert tokens == want.argmax(axis=-1).tolist()


@pytest.mark.parametrize("kv_cache_dtype,itemsize", [("auto", 4), ("fp8", 1), ("fp8_e5m2", 1)])
def test_kv_cache_budget_counts_the_cache_dtype(tmp_path, kv_cache_dtype, itemsize):
    # A byte budget holds budget // (layers x page x 2 x kv heads x head_dim x itemsize) pages:
    # four times as many in FP8 as in float32.
    config = family_config("llama")
    save_checkpoint(tmp_path, config)
    budget = 3 << 20
    args = {**ENGINE_ARGS, "num_pages": None, "kv_cache_memory_bytes": budget}
    llm = jaxpaged.LLM(model=str(tmp_path), kv_cache_dtype=kv_cache_dtype, **args)
    head_dim = config.hidden_size // config.num_attention_heads
    per_page = config.num_hidden_layers * args["page_size"] * 2 * config.num_key_value_heads * head_dim * itemsize
    assert llm.engine.pages.num_pages == budget // per_page
    assert llm.engine.runner.kv_pages[0].dtype.itemsize == itemsize


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"):
        EngineConfig(kv_cache_dtype="int8")


def test_smollm2_with_an_fp8_cache_matches_transformers(smollm2_path, hf_smollm2):
    # The real model: its keys and values must fit e4m3 as they are (no scale), so greedy text
    # follows transformers with the same FP8 cache token for token.
    model, tokenizer = hf_smollm2
    llm = jaxpaged.LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                       token_buckets=(8, 64), kv_cache_dtype="fp8")
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    outputs = llm.generate(prompts, jaxpaged.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt)["input_ids"]
        cache = Fp8Cache()
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  **cache_kwargs(model, cache))
        assert cache.get_seq_length() == len(ids) + 23  # generate used (and filled) this cache
        assert output.outputs[0].token_ids == want[0, len(ids):].tolist(), prompt
