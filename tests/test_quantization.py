"""FP8 linear layers (`quantization="fp8"`) against transformers with the same quantization
applied in torch (the oracle): each q/k/v/o/gate/up/down weight rounded to e4m3 per output
channel, and, where the engine quantizes activations, each linear's input rounded to e4m3 per
token by a forward pre-hook. Both paths of `quant.linear` are checked (activations quantized from
FP8_ACTIVATION_MIN_ROWS rows up, set here to send every bucket one way).

The engine and torch round the same float32 values, so most logits agree to ~1e-6; an input whose
scaled value lands on an e4m3 rounding boundary can round the other way in one implementation
(norms and attention differ in their last bits), which moves that step's logits by up to ~0.05.
The tests bound the median step tightly and every step loosely, and check that the quantization
itself moves logits far more than either bound (so a wrong scale, axis or rounding fails).
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
from test_models import (
    ENGINE_ARGS,
    NUM_DECODE_STEPS,
    PROMPT_LENS,
    VOCAB,
    family_config,
    run_engine,
    save_checkpoint,
    transformers_logits,
)

import jaxpaged
from jaxpaged.models import quant

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEDIAN_ATOL = 1e-4  # the typical step: float32 agreement
MAX_ATOL = 0.1  # the worst step: one input rounded the other way somewhere


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 with one scale per row (last axis): amax / 448, as vLLM's fp8."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fake_quantized(model, activations: bool):
    """A copy of the transformers model with its linear weights (and inputs) rounded to e4m3."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
                module.weight.copy_(fake_quant_rows(module.weight))  # HF weights are [out, in]
                if activations:
                    module.register_forward_pre_hook(lambda _, args: (fake_quant_rows(args[0]),))
    return model


def use_path(monkeypatch, activations: bool) -> None:
    """Every bucket through one path of quant.linear (read when a program is traced)."""
    monkeypatch.setattr(quant, "FP8_ACTIVATION_MIN_ROWS", 1 if activations else 1 << 30)


PATHS = [True, False]
PATH_IDS = ["w8a8", "weight_only"]


def check_steps(ours: np.ndarray, expected: np.ndarray, plain: np.ndarray, tokens, what: str):
    """ours / expected / plain (the unquantized model): logits [steps, V] at the same tokens."""
    diff = np.abs(ours - expected).max(axis=-1)  # [steps]
    assert np.median(diff) < MEDIAN_ATOL, f"{what}: median step differs by {np.median(diff):.2e}"
    assert diff.max() < MAX_ATOL, f"{what}: step {int(diff.argmax())} differs by {diff.max():.2e}"
    effect = np.abs(plain - expected).max(axis=-1)
    assert np.median(effect) > 100 * MEDIAN_ATOL, f"{what}: quantization moved logits only {effect}"
    # Greedy: our token is the oracle's argmax wherever the oracle's top two are not a near-tie.
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * MAX_ATOL
    assert (np.array(tokens)[clear] == expected.argmax(-1)[clear]).all(), what


# Every family with activations quantized (the path of large buckets), two without.
FAMILY_PATHS = [(family, True) for family in ("llama", "llama3_rope", "mistral", "qwen2", "qwen3")]
FAMILY_PATHS += [(family, False) for family in ("llama", "qwen2")]


@pytest.mark.parametrize("family, activations", FAMILY_PATHS,
                         ids=[f"{f}-{'w8a8' if a else 'weight_only'}" for f, a in FAMILY_PATHS])
def test_fp8_family_matches_fake_quantized_transformers(family, activations, tmp_path, monkeypatch):
    use_path(monkeypatch, activations)
    model = save_checkpoint(tmp_path, family_config(family))
    llm = jaxpaged.LLM(model=str(tmp_path), quantization="fp8", **ENGINE_ARGS)
    oracle = fake_quantized(model, activations)

    rng = np.random.default_rng(len(family))
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
    for prompt, steps in zip(prompts, run_engine(llm, prompts, NUM_DECODE_STEPS)):
        ours = np.stack([logits for logits, _ in steps])
        tokens = [token for _, token in steps]
        expected = transformers_logits(oracle, prompt + tokens, len(prompt))
        plain = transformers_logits(model, prompt + tokens, len(prompt))
        check_steps(ours, expected, plain, tokens, f"{family}, {len(prompt)}-token prompt")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in nats."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("activations", PATHS, ids=PATH_IDS)
def test_fp8_smollm2_stays_close_to_the_model(hf_smollm2, activations, monkeypatch):
    """The real model (tied embeddings, 30 layers, GQA 9/3). Its GGUF weights sit on a 4-bit grid,
    so many land exactly halfway between two e4m3 values, where the last bit of the division
    decides; and with activations quantized, the 30 layers amplify the rounding flips the norms'
    last bits cause: the oracle itself, run in float64 instead of float32, moves logits by up to
    3.7 (max over the vocabulary). So this test measures distributions: the engine's next-token
    distribution is close to the oracle's and to the unquantized model's, and its greedy
    answer is the unquantized model's."""
    use_path(monkeypatch, activations)
    model, tokenizer = hf_smollm2
    llm = jaxpaged.LLM(dtype="float32", max_model_len=256, max_num_seqs=2, max_num_batched_tokens=16,
                       token_buckets=(16,), quantization="fp8")  # the prompt prefills in chunks
    prompt = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_dict=True)["input_ids"])
    steps = run_engine(llm, [prompt], 12)[0]
    ours = np.stack([logits for logits, _ in steps])
    tokens = [token for _, token in steps]
    assert "Paris" in tokenizer.decode(tokens)
    oracle = transformers_logits(fake_quantized(model, activations), prompt + tokens, len(prompt))
    plain = transformers_logits(model, prompt + tokens, len(prompt))
    assert tokens == plain.argmax(-1).tolist()
    # Measured: KL(oracle || ours) <= 0.04 (mean 0.01) with activations quantized, <= 2e-4 without;
    # KL(plain || ours) <= 0.12 either way. (Each channel scaled by the mean scale instead: the
    # answer is lost.)
    assert kl(oracle, ours).mean() < (0.03 if activations else 1e-3), kl(oracle, ours)
    assert kl(plain, ours).mean() < 0.05, kl(plain, ours)


def test_quantize_weight_matches_numpy():
    """Per output channel e4m3, input axis last, against ml_dtypes' rounding; an all-zero
    channel (a padded head) quantizes to zeros, not NaN."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 2, 24)).astype(np.float32) * rng.uniform(0.01, 3, (1, 2, 24))
    w[:, 1, 5] = 0.0
    got = quant.quantize_weight(w)
    scale = np.abs(w).max(axis=0) / 448.0  # [2, 24]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.nan_to_num(w / scale)
    expected = np.moveaxis(scaled, 0, -1).astype(ml_dtypes.float8_e4m3fn)  # [2, 24, 48]
    assert got["weight"].dtype == ml_dtypes.float8_e4m3fn and got["weight"].shape == (2, 24, 48)
    np.testing.assert_array_equal(np.asarray(got["weight"]).view(np.uint8), expected.view(np.uint8))
    np.testing.assert_allclose(np.asarray(got["scale"])[scale > 0], scale[scale > 0], rtol=1e-6)
    assert not np.isnan(np.asarray(got["weight"], np.float32)).any()


def test_fp8_params_are_e4m3_and_freed(tmp_path):
    save_checkpoint(tmp_path, family_config("qwen2"))
    llm = jaxpaged.LLM(model=str(tmp_path), quantization="fp8", **ENGINE_ARGS)
    layer = llm.engine.params["layers"][0]
    for name in quant.QUANTIZED_LEAVES:
        assert layer[name]["weight"].dtype == ml_dtypes.float8_e4m3fn, name
        assert layer[name]["scale"].dtype == np.float32, name
    assert layer["gate_up_proj"]["weight"].shape == (2, 128, 96)  # [gate/up, F, D]: input last
    assert layer["qkv_bias"].dtype == np.float32 and llm.engine.params["embed"].dtype == np.float32
    assert llm.generate([[5, 6, 7]], jaxpaged.SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert llm.engine.config.quantization == "fp8"


def test_unknown_quantization_is_a_one_line_error():
    from test_cli import run_cli

    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        jaxpaged.LLM(quantization="int4")
    result = run_cli("generate", "hi", "--quantization", "int4", timeout=300)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("jaxpaged: error")] == [
        "jaxpaged: error: quantization must be one of fp8 (or unset), got 'int4'"]
    assert "Traceback" not in result.stderr


# ---- on the GPU: cuBLASLt's e4m3 GEMMs, XLA's GEMMs with the e4m3 -> float convert inside them,
# and the row-wise kernels between GEMMs (pallas_kernels/fp8_activations.py). In float32, as on
# the CPU: in bf16 the engine's own rounding moves these tiny models' logits as much as the
# quantization does (~0.3, measured on the CPU), so a bf16 comparison could not tell a wrong
# scale from rounding. The real SmolLM2 does not travel to the GPU machine (94 MiB).


@pytest.mark.gpu
@pytest.mark.parametrize("family, activations", [("llama", True), ("qwen2", True), ("llama", False)],
                         ids=["llama-w8a8", "qwen2-w8a8", "llama-weight_only"])
def test_fp8_family_on_gpu_matches_fake_quantized_transformers(family, activations, tmp_path, monkeypatch):
    import jax

    use_path(monkeypatch, activations)
    model = save_checkpoint(tmp_path, family_config(family))
    with jax.default_matmul_precision("highest"):  # float32 dots as float32 (not TF32) where not e4m3
        llm = jaxpaged.LLM(model=str(tmp_path), quantization="fp8", **ENGINE_ARGS)
        rng = np.random.default_rng(len(family))
        prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
        results = run_engine(llm, prompts, NUM_DECODE_STEPS)
    program = llm.engine.runner._forward_programs[ENGINE_ARGS["token_buckets"][0]].as_text()
    for kernel in ("swiglu_fp8", "add_rms_norm_fp8", "quantize_fp8"):  # where activations are e4m3
        assert (kernel in program) == activations, kernel
    oracle = fake_quantized(model, activations)
    for prompt, steps in zip(prompts, results):
        ours = np.stack([logits for logits, _ in steps])
        tokens = [token for _, token in steps]
        expected = transformers_logits(oracle, prompt + tokens, len(prompt))
        plain = transformers_logits(model, prompt + tokens, len(prompt))
        check_steps(ours, expected, plain, tokens, f"{family} on the GPU, {len(prompt)}-token prompt")

