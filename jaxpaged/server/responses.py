"""Engine outputs → OpenAI response bodies: choices, logprobs, usage, streamed deltas."""

import json

LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity


class TokenText:
    """The text of single tokens for logprobs (cached; the vocabulary bounds the cache)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def _finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def _ranked(entry: dict[int, float], sampled: int, k: int) -> list[tuple[int, float]]:
    """The top `k` of an engine logprobs entry, best first.

    An entry is {sampled: lp, **top_k}: k + 1 items when the sampled token is not in the top k.
    """
    items = entry.items() if len(entry) <= k else [(t, lp) for t, lp in entry.items() if t != sampled]
    return sorted(items, key=lambda item: -item[1])[:k]


def completion_logprobs(entries, token_ids, k: int, token_text: TokenText, offset: int):
    """OpenAI's legacy format for `token_ids[i]` with engine entries; returns (body, end offset).

    A None entry (the first prompt token, which nothing predicts) gets null logprobs.
    """
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, entries):
        text = token_text(token)
        if entry is None:
            for key, value in (("tokens", text), ("token_logprobs", None), ("top_logprobs", None),
                               ("text_offset", offset)):
                body[key].append(value)
            offset += len(text)
            continue
        top = {token_text(t): _finite(lp) for t, lp in _ranked(entry, token, k)}
        top.setdefault(text, _finite(entry[token]))
        body["tokens"].append(text)
        body["token_logprobs"].append(_finite(entry[token]))
        body["top_logprobs"].append(top)
        body["text_offset"].append(offset)
        offset += len(text)
    return body, offset


def chat_logprobs(entries, token_ids, k: int, token_text: TokenText) -> dict:
    def item(token, logprob):
        text = token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {"content": [
        {**item(token, entry[token]),
         "top_logprobs": [item(t, lp) for t, lp in _ranked(entry, token, k)]}
        for token, entry in zip(token_ids, entries)]}


def completion_choices(finals, texts, body, token_text: TokenText) -> tuple[list[dict], int]:
    """Choices of a whole (non-streamed) /v1/completions response, and the tokens generated.

    `finals` holds one finished RequestOutput per prompt, `texts` the prompt texts (for echo),
    `body` the parsed CompletionRequest.
    """
    n, k = body.params.n, body.params.logprobs
    choices, num_generated = [], 0
    for p, output in enumerate(finals):
        prefix = texts[p] if body.echo else ""
        for c in output.outputs:
            # max_tokens=0: the engine generated one token to get there; it is not returned.
            token_ids, entries, text, finish, stop_reason = (
                ([], [], "", "length", None) if body.prompt_only
                else (c.token_ids, c.logprobs, c.text, c.finish_reason, c.stop_reason))
            logprobs = None
            if k is not None:
                logprobs, _ = completion_logprobs(entries, token_ids, k, token_text, len(prefix))
                if body.echo:  # prompt tokens first, offsets counted from the prompt's start
                    echoed, _ = completion_logprobs(output.prompt_logprobs,
                                                    output.prompt_token_ids, k, token_text, 0)
                    logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
            choices.append({"index": p * n + c.index, "text": prefix + text, "logprobs": logprobs,
                            "finish_reason": finish, "stop_reason": stop_reason})
            num_generated += len(token_ids)
    return choices, num_generated


def chat_choices(output, top_logprobs: int | None, token_text: TokenText) -> tuple[list[dict], int]:
    """Choices of a whole (non-streamed) chat completion, and the tokens generated."""
    choices = [{
        "index": c.index, "message": {"role": "assistant", "content": c.text},
        "logprobs": (None if top_logprobs is None
                     else chat_logprobs(c.logprobs, c.token_ids, top_logprobs, token_text)),
        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
    } for c in output.outputs]
    return choices, sum(len(c.token_ids) for c in output.outputs)


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


class ChoiceStream:
    """What one streamed choice has sent so far.

    While the sequence runs, the last `holdback` characters (the longest stop string minus one)
    stay unsent: they may turn out to be the start of a stop string that the engine then cuts.
    """

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.num_chars = 0
        self.num_tokens = 0
        self.done = False

    def advance(self, completion) -> tuple[str, int, str | None] | None:
        """(new text, index of the first unsent token, finish reason) or None if nothing new."""
        if self.done:
            return None
        text, finished = completion.text, completion.finish_reason is not None
        end = len(text) if finished else max(self.num_chars, len(text) - self.holdback)
        piece, first_token = text[self.num_chars:end], self.num_tokens
        self.num_chars = max(self.num_chars, end)
        self.num_tokens = len(completion.token_ids)
        self.done = finished
        if not piece and not finished and self.num_tokens == first_token:
            return None
        return piece, first_token, completion.finish_reason


def sse(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
