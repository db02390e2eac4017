"""Each model family end to end through the engine, checked against transformers as the oracle.

Tiny random checkpoints are saved with transformers in float32; the engine's own scheduler and
runner prefill a ragged batch (one prompt in two chunks) and decode 16 greedy steps, and at every
step the logits must match transformers running each sequence alone on the same tokens.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jaxpaged
from jaxpaged.config import ModelConfig, pick_bucket
from jaxpaged.models.layers import rope_inv_freq
from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxpaged.step_inputs import build_step_inputs, forward_arrays, pack

VOCAB = 512
ATOL = 1e-4
NUM_DECODE_STEPS = 16
# 40 tokens exceed the 32-token step budget, so that prompt prefills in two chunks while the
# others are already decoding beside it.
PROMPT_LENS = (5, 13, 40)
# One small bucket set for every model keeps compile time down.
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                   token_buckets=(16, 32), page_size=8, num_pages=32)

COMMON = dict(vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=256, initializer_range=0.1)
FAMILIES = {
    # GQA 4/2, untied, plain rope.
    "llama": (transformers.LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # GQA 6/2, tied. head_dim 16 at theta 5e5 gives wavelengths 6, 32, 167, ... against the
    # thresholds 64/4 and 64/1: one kept, one blended, the rest slowed by `factor`.
    "llama3_rope": (transformers.LlamaConfig, dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 500000.0})),
    # MHA 4/4, untied; a 16-token sliding window, shorter than the longer sequences.
    "mistral": (transformers.MistralConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        sliding_window=16, tie_word_embeddings=False)),
    # GQA 6/1 with q/k/v biases, untied.
    "qwen2": (transformers.Qwen2Config, dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False)),
    # GQA 4/2, q/k norm, head_dim 32 (not 64 / 4), tied.
    "qwen3": (transformers.Qwen3Config, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        tie_word_embeddings=True)),
}


# ---------------------------------------------------------------- checkpoints


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocab: the engine loads one with every model."""
    vocab = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def save_checkpoint(path: Path, config) -> transformers.PreTrainedModel:
    """A random float32 model with norms and biases moved off their init, saved as safetensors."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # init 1: scale each channel differently so the norms matter
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
            elif name.endswith(".bias"):  # init 0
                param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return model


def family_config(family: str):
    config_class, kwargs = FAMILIES[family]
    return config_class(**COMMON, **kwargs)


# ---------------------------------------------------------------- driving the engine


def run_engine(llm, prompts: list[list[int]], num_decode_steps: int):
    """Prefills `prompts` as one ragged batch, then decodes greedily through the engine's own
    scheduler and runner; returns per prompt a list of (logits [V], sampled token) per generated
    token: the first from the prefill, then one per decode step."""
    engine = llm.engine
    runner = engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=num_decode_steps + 1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    requests = [engine.groups[str(i)].sequences[0] for i in range(len(prompts))]
    steps: dict[int, list] = {id(r): [] for r in requests}
    num_partial_chunks = 0
    while engine.has_unfinished:
        batch = engine.scheduler.schedule()
        for request, n in zip(batch.requests, batch.num_new_tokens):
            if n < request.num_tokens - request.num_computed_tokens:
                num_partial_chunks += 1
        inputs = build_step_inputs(
            batch.requests, batch.num_new_tokens,
            token_bucket=pick_bucket(engine.token_buckets, batch.total_tokens),
            max_num_seqs=engine.config.max_num_seqs, pages_per_seq=engine.pages_per_seq,
            history_width=1)
        buffer, layout = pack(forward_arrays(inputs))
        logits, _, runner.kv_pages = runner._forward(runner.params, runner.kv_pages, buffer,
                                                     runner._last_token_ids, layout)
        buffer, layout = pack(inputs.sampling)
        sampled = runner._sample(logits, buffer, layout=layout, apply_penalties=False,
                                 num_top_logprobs=MAX_LOGPROBS)
        logits, token_ids = np.asarray(logits), np.asarray(sampled.token_ids)
        advanced = {id(r) for r in engine.scheduler.update(batch, token_ids)}
        for row, request in enumerate(batch.requests):
            if id(request) in advanced:
                steps[id(request)].append((logits[row], int(token_ids[row])))
    assert num_partial_chunks >= 1, "the long prompt should have been prefilled in two chunks"
    return [steps[id(r)] for r in requests]


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands `cache` to a transformers model: `cache` in transformers 5.2x,
    `past_key_values` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def transformers_logits(model, tokens: list[int], num_prompt: int, cache=None) -> np.ndarray:
    """Logits [num_generated, V] at the positions where the engine sampled, from one causal
    forward over the sequence alone (position p's logits see exactly tokens[:p + 1]). cache: a
    transformers Cache whose stored keys and values attention reads (None: no cache)."""
    kwargs = {} if cache is None else {**cache_kwargs(model, cache), "use_cache": True}
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]), **kwargs).logits[0]  # [L - 1, V]
    return logits[num_prompt - 1:].numpy()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    model = save_checkpoint(tmp_path, family_config(family))
    llm = jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)

    rng = np.random.default_rng(len(family))
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
    results = run_engine(llm, prompts, NUM_DECODE_STEPS)

    worst = 0.0
    for prompt, steps in zip(prompts, results):
        assert len(steps) == NUM_DECODE_STEPS + 1
        ours = np.stack([logits for logits, _ in steps])  # [17, V]
        tokens = [token for _, token in steps]
        expected = transformers_logits(model, prompt + tokens, len(prompt))  # [17, V]
        diff = np.abs(ours - expected).max(axis=-1)  # [17]
        worst = max(worst, float(diff.max()))
        assert diff[0] < ATOL, (f"prefill logits of the {len(prompt)}-token prompt differ by "
                                f"{diff[0]:.2e}")
        assert diff.max() < ATOL, (f"decode logits of the {len(prompt)}-token prompt differ by up "
                                   f"to {diff.max():.2e} (step {int(diff.argmax())})")
        assert tokens == expected.argmax(axis=-1).tolist()
    print(f"{family}: max |logits diff| {worst:.2e}")


def test_llama3_rope_frequencies_match_transformers():
    hf = family_config("llama3_rope")
    config = ModelConfig.from_hf_config(hf)
    ours = rope_inv_freq(config.head_dim, config.rope_theta, dict(config.rope_scaling))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    # The tiny head_dim must reach all three bands (kept, blended, slowed by `factor` = 8), or the
    # end-to-end llama3 test would not exercise the scaling.
    ratio = ours / rope_inv_freq(config.head_dim, config.rope_theta, {})
    assert ratio[0] == 1 and 1 / 8 < ratio[1] < 1 and np.allclose(ratio[2:], 1 / 8)


def test_unsupported_model_type_is_refused(tmp_path):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=64, bos_token_id=1, eos_token_id=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)


def test_tensor_of_wrong_shape_is_named(tmp_path):
    save_checkpoint(tmp_path, family_config("llama"))
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]  # one row short of intermediate_size
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} has shape \(127, 64\), expected \(128, 64\)"):
        jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)


def test_missing_half_of_a_stacked_weight_is_named(tmp_path):
    # gate and up load into one [D, 2, F] leaf: a checkpoint with only one of them is refused.
    save_checkpoint(tmp_path, family_config("llama"))
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors the model needs: model\.layers\.0\.mlp\.up_proj\.weight$"):
        jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)


def test_unsupported_rope_type_is_refused(tmp_path):
    config = family_config("llama")
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 64}
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
])
def test_unimplemented_options_are_refused(overrides, message):
    from jaxpaged.config import ModelConfig

    config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, **overrides}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(config)


# ---------------------------------------------------------------- config.json without transformers

MINIMAL = dict(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=32)  # divisible by every family's default KV heads


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("variant", ["saved", "only_model_type", "minimal", "nulls", "legacy_rope"])
def test_config_json_reads_like_transformers(tmp_path, family, variant):
    """The engine reads config.json itself (no transformers import at start-up); a field the file
    leaves out must take the value transformers' config class gives it."""
    import json

    from jaxpaged.model_source import resolve_model

    config_class, kwargs = FAMILIES[family]
    model_type = config_class.model_type
    if variant == "saved":  # what save_pretrained writes: every field
        config_class(**COMMON, **kwargs).save_pretrained(tmp_path)
    else:
        data = {"model_type": model_type, **(MINIMAL if variant != "only_model_type" else {})}
        if variant == "nulls":  # those transformers 5 accepts as null for the family
            data.update(sliding_window=None)
            data.update({} if model_type == "qwen3" else {"head_dim": None})
            data.update({} if model_type == "mistral" else {"num_key_value_heads": None})
        if variant == "legacy_rope":  # transformers 4's layout: rope_theta + rope_scaling
            data.update(rope_theta=500000.0, torch_dtype="bfloat16", rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        (tmp_path / "config.json").write_text(json.dumps(data))
    source = resolve_model(str(tmp_path))
    assert source.model_config() == ModelConfig.from_hf_config(source.hf_config())


def test_engine_start_up_does_not_import_transformers():
    """A model without tokenizer files (a shipped config, dummy weights: the start-up benchmark)
    starts without importing transformers or torch."""
    import subprocess
    import sys

    script = ("import sys, jaxpaged; from jaxpaged.engine import Engine; "
              "from jaxpaged.config import EngineConfig; "
              "Engine(EngineConfig(model='llama-3.2-1b', load_format='dummy', dtype='float32', "
              "max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, token_buckets=(16,), "
              "num_pages=8)); "
              "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
