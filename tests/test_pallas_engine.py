"""The engine's Pallas attention path against its reference path, end to end.

On CPU the Pallas backend is the GPU kernel in interpret mode; on a GPU (device tool, marked
`gpu`) it is the compiled Triton kernel. Greedy decoding must give the same tokens as the
reference backend for the same model and prompts; a 32-token budget forces chunked prefill and
mixed prefill + decode steps, and 3 q heads per kv head exercise the padded GQA group.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged import LLM
from jaxpaged.attention import make_attention, resolve_backend
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.step_inputs import AttentionMetadata
from pallas_kernels import ragged_paged_attention_reference
from pallas_kernels.gpu import compiled_supports

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


def test_auto_on_gpu_falls_back_for_geometries_the_kernel_cannot_compile():
    assert compiled_supports(64, 128) and not compiled_supports(8, 128) and not compiled_supports(16, 80)
    # head_dim 80: "auto" on GPU traces the reference (so this runs on CPU too); "pallas" refuses.
    metadata = AttentionMetadata(
        positions=jnp.array([2], jnp.int32), kv_lens=jnp.array([3], jnp.int32),
        page_indices=jnp.array([[1]], jnp.int32), cu_q_lens=jnp.array([0, 1], jnp.int32),
        num_seqs=jnp.array([1], jnp.int32), logits_indices=jnp.array([0], jnp.int32))
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 2, 80), (1, 1, 80), (1, 1, 80), (2, 16, 2, 80))]
    got, _, _ = make_attention("auto", platform="gpu", sm_scale=0.1, sliding_window=None)(*args, metadata)
    want, _ = ragged_paged_attention_reference(*args, metadata.kv_lens, metadata.page_indices,
                                               metadata.cu_q_lens, metadata.num_seqs, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="power-of-two"):
        jax.eval_shape(lambda *a: make_attention("pallas", platform="gpu", sm_scale=0.1, sliding_window=None)(*a, metadata), *args)


@pytest.mark.slow
def test_engine_pallas_matches_reference_greedy():
    want = greedy_tokens(LLM(attention_backend="reference", **ENGINE), 6)
    llm = LLM(attention_backend="pallas", **ENGINE)
    # Steps where all three prompts decode run the decode-only program (KV write fused).
    runner = llm.engine.runner
    assert runner.decode_buckets == (32,)
    decode_program, calls = runner._decode_programs[32], []
    runner._decode_programs[32] = lambda *a: calls.append(a) or decode_program(*a)
    got = greedy_tokens(llm, 6)
    assert got == want
    assert len(calls) >= 4  # the last 5 tokens of every prompt are decode-only steps


# SmolLM2-135M-Instruct's shapes (its config.json), so the GPU test needs no download.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
# Token-id prompts (no tokenizer on the device): a short one, one longer than the 32-token
# budget (chunked prefill) and one in between.
PROMPT_IDS = [[1, 504, 3575, 282, 4649, 314], [(7 * i) % 49000 + 20 for i in range(45)],
              [28, 30, 216, 33, 30, 216, 34, 30]]


def random_smollm2_dir(tmp_path_factory):
    """SmolLM2-135M's shapes with random weights, saved by transformers: nothing to fetch, so
    the test runs on a device machine that cannot download the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("random_smollm2")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).to(torch.float32).save_pretrained(target)
    return str(target)


def greedy_token_ids(llm, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPT_IDS, params, use_tqdm=False)]


@pytest.mark.gpu
def test_engine_pallas_matches_reference_greedy_on_gpu(tmp_path_factory):
    # float32 with "highest" matmuls on both sides (the kernel's dots are exact in float32), so
    # the only difference is the order of the sums; random weights keep the GGUF off the device.
    import jax

    model = random_smollm2_dir(tmp_path_factory)
    engine = dict(ENGINE, max_model_len=256, num_pages=64)
    with jax.default_matmul_precision("highest"):  # programs compile in LLM(): trace-time setting
        want = greedy_token_ids(LLM(model, attention_backend="reference", **engine), 24)
        got = greedy_token_ids(LLM(model, attention_backend="pallas", **engine), 24)
    assert got == want


@pytest.mark.gpu
def test_engine_cudnn_first_chunks_on_gpu(tmp_path_factory):
    # bf16: prompts' first chunks attend through cuDNN. Against the reference backend, the prompt
    # logprobs may differ by bf16 rounding, but by no more than the Pallas prefill kernel's do
    # (that kernel matches the reference in float32 above); a 45-token prompt over the 32-token
    # budget puts its second chunk on the Pallas kernel.
    from jaxpaged import attention

    model = random_smollm2_dir(tmp_path_factory)
    engine = dict(ENGINE, dtype="bfloat16", max_model_len=256, num_pages=64)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=0)

    def prompt_logprobs(backend, cudnn=False):
        saved, attention.CUDNN_PREFILL = attention.CUDNN_PREFILL, cudnn
        try:
            assert attention.first_chunk_backend(backend, "gpu") == ("cudnn" if cudnn else backend)
            outputs = LLM(model, attention_backend=backend, **engine).generate(PROMPT_IDS, params, use_tqdm=False)
        finally:
            attention.CUDNN_PREFILL = saved
        return np.array([lp for out in outputs for entry in out.prompt_logprobs[1:]
                         for lp in entry.values()], np.float64)

    want = prompt_logprobs("reference")
    pallas_only = prompt_logprobs("pallas")
    got = prompt_logprobs("pallas", cudnn=True)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= max(2 * np.abs(pallas_only - want).max(), 0.02)
