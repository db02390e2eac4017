"""Prompts to token ids, shared by the offline API and the server. Host-side, no JAX.

One place decides how a prompt is encoded, how a conversation goes through the chat template,
and which sampling defaults a model's generation_config.json supplies, so `LLM.generate` and
`POST /v1/completions` (or `LLM.chat` and `POST /v1/chat/completions`) see the same token ids.
"""

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")

# generation_config.json keys that become SamplingParams defaults (vLLM reads the same ones).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: dict) -> dict:
    """The SamplingParams defaults a model's generation_config.json sets."""
    return {k: generation_config[k] for k in GENERATION_DEFAULT_KEYS
            if generation_config.get(k) is not None}


def is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def encode_prompts(tokenizer, prompts) -> tuple[list[list[int]], list[str | None], list[str | None]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists; each prompt
    may also be a dict {"prompt": str} or {"prompt_token_ids": [...]} with an optional
    "cache_salt" (as vLLM accepts).

    Returns (token ids, text or None, cache salt or None) per prompt.
    """
    if isinstance(prompts, (str, dict)) or (is_token_ids(prompts) and prompts):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of strings, or token-id lists")
    token_lists, texts, salts = [], [], []
    for prompt in prompts:
        salt = None
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError('a dict prompt needs exactly one of "prompt" and "prompt_token_ids" '
                                 'and may add "cache_salt"')
            salt = prompt.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise ValueError("cache_salt must be a string")
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
        salts.append(salt)
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer (a shipped config with "
                                 "load_format='dummy'): pass prompts as token ids")
            token_lists.append(tokenizer(prompt).input_ids)
            texts.append(prompt)
        elif is_token_ids(prompt):
            token_lists.append(list(prompt))
            texts.append(None)
        else:
            raise ValueError("each prompt must be a string or a list of token ids, "
                             f"got {type(prompt).__name__}")
    return token_lists, texts, salts


def render_chat(tokenizer, conversation: list[dict], *, add_generation_prompt: bool = True,
                chat_template: str | None = None) -> tuple[list[int], str]:
    """One conversation through the chat template: (token ids, prompt text)."""
    check_conversation(conversation)
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model has none (a shipped config with "
                         "load_format='dummy'); pass prompts as token ids to generate instead")
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)
    # The template already carries any BOS token, so add no special tokens again.
    return tokenizer(text, add_special_tokens=False).input_ids, text


def check_conversation(conversation) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    for message in conversation:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError('each message must be a dict with "role" and "content"')
        if message["role"] not in MESSAGE_ROLES:
            raise ValueError(f"unknown message role {message['role']!r}; "
                             f"expected one of {', '.join(MESSAGE_ROLES)}")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Tokenizes a (context, continuation) pair the way lm-evaluation-harness does.

    Trailing spaces move from the context to the continuation; the whole string is encoded once
    (no special tokens) and split where the context's own tokens end, so the continuation's
    tokens are those a model reading the whole text would see. An empty context is replaced by
    the BOS (else EOS) token, lm-eval's prefix token. Returns (whole token ids, context length).
    """
    if not continuation:
        raise ValueError("each continuation must be a non-empty string")
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        whole = [prefix] + tokenizer.encode(continuation, add_special_tokens=False)
        return whole, 1
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    num_context = len(tokenizer.encode(context, add_special_tokens=False))
    if num_context >= len(whole):
        raise ValueError(f"the continuation {continuation!r} adds no tokens to its context")
    return whole, num_context
