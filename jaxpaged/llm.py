"""The offline API, named like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""

import itertools

from tqdm.auto import tqdm

from jaxpaged.config import EngineConfig
from jaxpaged.engine import Engine, enable_compilation_cache
from jaxpaged.request import RequestOutput
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
        defaults = self.engine.generation_defaults
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return SamplingParams(**{k: defaults[k] for k in keys if defaults.get(k) is not None})

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, a list of token ids, or a list of token-id lists.

        Returns one RequestOutput per prompt, in input order.
        """
        token_lists, texts = self._encode(prompts)
        return self._run(token_lists, texts, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        texts = []
        for conversation in conversations:
            _check_conversation(conversation)
            texts.append(tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template))
        # The template already carries any BOS token, so add no special tokens again.
        token_lists = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return self._run(token_lists, texts, sampling_params, use_tqdm)

    # ---- internals ---------------------------------------------------------------------------

    def _encode(self, prompts) -> tuple[list[list[int]], list[str | None]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a string, a list of strings, or token-id lists")
        tokenizer = self.get_tokenizer()
        token_lists, texts = [], []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_lists.append(tokenizer(prompt).input_ids)
                texts.append(prompt)
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                token_lists.append(list(prompt))
                texts.append(None)
            else:
                raise ValueError(f"each prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return token_lists, texts

    def _run(self, token_lists, texts, sampling_params, use_tqdm) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"got {len(params)} SamplingParams for {len(token_lists)} prompts")
        engine = self.engine
        request_ids = [str(next(self._ids)) for _ in token_lists]
        try:
            for request_id, tokens, text, p in zip(request_ids, token_lists, texts, params):
                engine.add_request(request_id, tokens, p, prompt=text)
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


def _check_conversation(conversation) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    for message in conversation:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError('each message must be a dict with "role" and "content"')
        if message["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"unknown message role {message['role']!r}")
