"""SmolLM2-135M-Instruct end to end, against transformers' generate (the oracle).

Tests that take `scheduling` run twice on the same engine: synchronous steps (the CPU default) and
async scheduling (the GPU/TPU default: step N+1 is dispatched before step N's ids reach the host).
"""

import functools

import pytest
import torch

from jaxpaged import SamplingParams
from jaxpaged.runner import CompileCounter

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "List three primary colours:",
    "Translate 'good morning' into Spanish, French and German, and explain when each greeting is "
    "used during the day. Then give a short example dialogue between two friends meeting at a "
    "cafe in the morning, written in all three languages, one after another.",
    "1, 2, 3, 4,",
    "Explain why the sky is blue in one paragraph, using simple words a child would understand, "
    "and mention Rayleigh scattering by name. " * 3,
]


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def scheduling(request, smollm2_llm):
    engine = smollm2_llm.engine
    before = engine.async_scheduling
    engine.async_scheduling = request.param
    yield request.param
    assert not engine.has_unfinished
    engine.async_scheduling = before


@functools.lru_cache(maxsize=None)
def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def test_greedy_tokens_equal_transformers(smollm2_llm, hf_smollm2, scheduling):
    model, tokenizer = hf_smollm2
    engine = smollm2_llm.engine
    preemptions_before = engine.scheduler.num_preemptions
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert max(lengths) > engine.config.max_num_batched_tokens  # chunked prefill happens
    outputs = smollm2_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32),
                                   use_tqdm=False)
    assert engine.scheduler.num_preemptions > preemptions_before  # the small pool preempted
    for prompt, output in zip(PROMPTS, outputs):
        expected = hf_greedy(model, tokenizer, prompt, 32)
        assert output.outputs[0].token_ids == expected, prompt
        assert output.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_chat_answers_capital_question(smollm2_llm):
    output = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # <|im_end|> is the EOS token


def test_seeded_sampling_is_batch_independent(smollm2_llm, scheduling):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24)
    alone = smollm2_llm.generate("Tell me a story about a dragon.", params, use_tqdm=False)[0]
    others = [SamplingParams(temperature=t, top_k=k, max_tokens=m, seed=None)
              for t, k, m in [(0.0, 0, 8), (1.0, 5, 30), (0.7, 0, 12), (1.2, 40, 20),
                              (0.0, 0, 40), (0.5, 3, 16), (1.0, 0, 28)]]
    prompts = ["Hello there", "Count: 1, 2,", "A poem:", "Why?", "Name a fruit.",
               "Tell me a story about a dragon.", "x = 1\ny =", "The weather today"]
    batch = smollm2_llm.generate(prompts, others[:5] + [params] + others[5:], use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone.outputs[0].token_ids
    again = smollm2_llm.generate("Tell me a story about a dragon.", params, use_tqdm=False)[0]
    assert again.outputs[0].text == alone.outputs[0].text
    different = smollm2_llm.generate("Tell me a story about a dragon.",
                                     SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=24),
                                     use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_no_compiles_after_warmup(smollm2_llm, scheduling):
    """The recompilation tripwire: a varied workload after warm-up compiles nothing."""
    workloads = [
        (["Hi"], SamplingParams(temperature=0, max_tokens=3)),
        (["A much longer prompt that will need more than one chunk of prefill to get through "
          "because the token budget is small in this engine configuration. " * 2] * 3,
         SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=10)),
        (["Penalties", "too"], SamplingParams(temperature=1.0, repetition_penalty=1.3,
                                              presence_penalty=0.5, frequency_penalty=0.5,
                                              min_p=0.05, max_tokens=12, logprobs=5)),
        (["n=2 with stops"], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=20,
                                            stop=["\n"], min_tokens=2)),
        ([[1, 2, 3, 4, 5, 6, 7]] * 8, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
        (["Prompt logprobs " * 30, "and a short one"],
         SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=5)),
    ]
    with CompileCounter() as counter:
        for prompts, params in workloads:
            outputs = smollm2_llm.generate(prompts, params, use_tqdm=False)
            assert all(o.finished for o in outputs)
    assert counter.count == 0
