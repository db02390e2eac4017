"""The offline API, named like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""

import itertools

from tqdm.auto import tqdm

from jaxpaged.config import EngineConfig
from jaxpaged.engine import Engine, enable_compilation_cache
from jaxpaged.prompts import encode_pair, encode_prompts, render_chat, sampling_defaults
from jaxpaged.request import RequestOutput, ScoreOutput
from jaxpaged.sampling_params import SamplingParams


class LLM:
    """Generates text for batches of prompts with continuous batching.

    Args mirror vLLM's `LLM`: `model` (None: the embedded SmolLM2-135M-Instruct; an HF directory, a
    .gguf file or a Hub name), `dtype`, `max_model_len`, `max_num_seqs`,
    `max_num_batched_tokens`, `attention_backend` ("auto" | "reference" | "pallas"), `seed`, and the
    KV-cache knobs `page_size`, `num_pages`, `gpu_memory_utilization`, `kv_cache_memory_bytes`.
    """

    def __init__(self, model: str | None = None, **engine_args):
        known = set(EngineConfig.__dataclass_fields__)
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown LLM argument(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known - {'model'}))}")
        enable_compilation_cache()
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json, else vLLM's defaults."""
        return SamplingParams(**sampling_defaults(self.engine.generation_defaults))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, a list of token ids, or a list of token-id lists.

        Returns one RequestOutput per prompt, in input order.
        """
        token_lists, texts, salts = encode_prompts(self.get_tokenizer(), prompts)
        return self._run(token_lists, texts, sampling_params, use_tqdm, salts)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        rendered = [render_chat(self.get_tokenizer(), conversation, chat_template=chat_template,
                                add_generation_prompt=add_generation_prompt)
                    for conversation in conversations]
        token_lists, texts = [r[0] for r in rendered], [r[1] for r in rendered]
        return self._run(token_lists, texts, sampling_params, use_tqdm)

    def score(self, contexts: list[str], continuations: list[str], *,
              use_tqdm: bool = True) -> list[ScoreOutput]:
        """log p(continuation | context) per pair, and whether greedy decoding would produce it.

        What lm-evaluation-harness's `loglikelihood` needs. Pairs are tokenized as lm-eval does
        (`prompts.encode_pair`: encode the whole text, split where the context's tokens end) and
        scored in one batched run from the prompt logprobs of context + continuation.
        """
        if len(contexts) != len(continuations):
            raise ValueError(f"got {len(contexts)} contexts for {len(continuations)} continuations")
        if not contexts:
            return []
        pairs = [encode_pair(self.get_tokenizer(), c, x) for c, x in zip(contexts, continuations)]
        # prompt_logprobs=1 brings the argmax along with the actual token: the greedy check.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self._run([whole for whole, _ in pairs], [None] * len(pairs), params, use_tqdm)
        scores = []
        for (whole, num_context), output in zip(pairs, outputs):
            token_ids = whole[num_context:]
            positions = output.prompt_logprobs[num_context:]
            token_logprobs = [entry[token] for token, entry in zip(token_ids, positions)]
            is_greedy = all(max(entry, key=entry.get) == token
                            for token, entry in zip(token_ids, positions))
            scores.append(ScoreOutput(sum(token_logprobs), is_greedy, token_ids, token_logprobs))
        return scores

    # ---- internals ---------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Drops every cached prefix page; False (and nothing dropped) while requests run."""
        return self.engine.pages.reset_prefix_cache()

    def _run(self, token_lists, texts, sampling_params, use_tqdm, salts=None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"got {len(params)} SamplingParams for {len(token_lists)} prompts")
        engine = self.engine
        request_ids = [str(next(self._ids)) for _ in token_lists]
        salts = salts or [None] * len(token_lists)
        try:
            for request_id, tokens, text, p, salt in zip(request_ids, token_lists, texts, params, salts):
                engine.add_request(request_id, tokens, p, prompt=text, cache_salt=salt)
        except ValueError:
            for request_id in request_ids:  # all or nothing: leave no half-added batch behind
                engine.abort(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm,
                  unit="req") as progress:
            while engine.has_unfinished:
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        progress.update(1)
        return [results[request_id] for request_id in request_ids]

