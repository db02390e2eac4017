"""load_format="dummy": random weights of a model's real shapes, no checkpoint, no tokenizer."""

import json

import numpy as np
import pytest

from jaxpaged.config import EngineConfig, ModelConfig
from jaxpaged.model_source import resolve_model, shipped_model_names

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF directory with config.json only: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("tiny-dummy")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def dummy_llm(tiny_dir):
    from jaxpaged import LLM

    return LLM(str(tiny_dir), load_format="dummy", max_model_len=64, max_num_seqs=4,
               max_num_batched_tokens=32, token_buckets=(16, 32))


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b"])
def test_shipped_config_has_the_published_shapes(name):
    """Parameter count of our param tree == transformers' model built from the same config.json."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpaged.models.params import random_params

    source = resolve_model(name, "dummy")
    assert source.tokenizer() is None
    hf_config = source.hf_config()
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in hf_model.parameters())
    published = {"llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
                 "qwen2.5-7b": 7_615_616_512}[name]
    assert expected == published
    config = ModelConfig.from_hf_config(hf_config)
    shapes = jax.eval_shape(lambda: random_params(config, np.float32))  # nothing materialised
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == published
    assert name in shipped_model_names()


def test_dummy_weights_run_the_real_forward(dummy_llm):
    """The engine on dummy weights == transformers greedy decoding with the same weights copied in."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxpaged import SamplingParams

    params = dummy_llm.engine.params
    assert float(np.asarray(params["final_norm"]).std()) == 0.0  # norm scales are ones
    assert 0.015 < float(np.asarray(params["layers"][0]["qkv_proj"]).std()) < 0.025
    config = AutoConfig.for_model(**TINY)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"],
             "lm_head.weight": np.asarray(params["lm_head"]).T}
    hf_names = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm",
                "o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}
    heads, kv_heads = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    head_dim, group = TINY["hidden_size"] // heads, heads // kv_heads
    for i, layer in enumerate(params["layers"]):
        for ours, theirs in hf_names.items():
            value = np.asarray(layer[ours])
            state[f"model.layers.{i}.{theirs}.weight"] = value.T if value.ndim == 2 else value
        # [D, Hkv * (G + 2) * hd]: per KV head its G query heads, then its key, then its value
        qkv = np.asarray(layer["qkv_proj"]).reshape(-1, kv_heads, group + 2, head_dim)
        for name, part in (("q", qkv[:, :, :group]), ("k", qkv[:, :, group]), ("v", qkv[:, :, group + 1])):
            state[f"model.layers.{i}.self_attn.{name}_proj.weight"] = part.reshape(len(part), -1).T
        gate_up = np.asarray(layer["gate_up_proj"])  # [D, 2, F]: gate, then up
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = gate_up[:, 0].T
        state[f"model.layers.{i}.mlp.up_proj.weight"] = gate_up[:, 1].T
    model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    prompts = [[5, 17, 42, 99, 3], [200, 1, 2]]
    outputs = dummy_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                 use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            # No EOS on the HF side either (ignore_eos): its config defaults to EOS id 2, which
            # min_new_tokens would ban and random weights may well prefer.
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=6, eos_token_id=None,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].text == ""  # no tokenizer: token ids only


def test_without_a_tokenizer_text_needs_are_refused(dummy_llm):
    from jaxpaged import SamplingParams

    with pytest.raises(ValueError, match="no tokenizer.*token ids"):
        dummy_llm.generate("hello")
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        dummy_llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        dummy_llm.generate([[1, 2]], SamplingParams(max_tokens=2, stop=["x"]), use_tqdm=False)


def test_weightless_model_needs_load_format_dummy(tiny_dir):
    from jaxpaged import LLM

    with pytest.raises(FileNotFoundError, match="no weights.*load-format dummy"):
        LLM(str(tiny_dir))
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        EngineConfig(load_format="npz")
