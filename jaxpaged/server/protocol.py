"""OpenAI request bodies → validated requests with SamplingParams. Host-side, no JAX.

Every problem becomes an `APIError` (HTTP 400 unless said otherwise) naming the field, never a
422 or a traceback. Defaults: the request, then the model's generation_config.json, then OpenAI's
(temperature 1, top_p 1, max_tokens = the rest of the context).
"""

import json
import math
from dataclasses import dataclass

from jaxpaged.prompts import is_token_ids, render_chat, sampling_defaults
from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # sequences one request may ask for (prompts × n)
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
FLOAT32_MAX = 3.4e38


class APIError(Exception):
    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def parse_json(raw: bytes) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError too
        raise APIError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    return data


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) <= FLOAT32_MAX)


_KINDS = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "str_or_list": (lambda v: isinstance(v, str) or (isinstance(v, list) and
                                                     all(isinstance(s, str) for s in v)),
                    "a string or an array of strings"),
    "int_list": (is_token_ids, "an array of integers"),
}


class Fields:
    """Typed reads from a JSON object; a missing or null field gives the default."""

    def __init__(self, data: dict):
        self.data = data

    def get(self, name: str, kind: str, default=None):
        value = self.data.get(name)
        if value is None:
            return default
        ok, what = _KINDS[kind]
        if not ok(value):
            raise APIError(f"'{name}' must be {what}, got {_short(value)}", param=name)
        return value


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Request fields passed straight to SamplingParams, with their JSON kinds.
_SAMPLING_FIELDS = {
    "n": "int", "temperature": "number", "top_p": "number", "top_k": "int", "min_p": "number",
    "presence_penalty": "number", "frequency_penalty": "number", "repetition_penalty": "number",
    "seed": "int", "stop": "str_or_list", "stop_token_ids": "int_list",
    "include_stop_str_in_output": "bool", "ignore_eos": "bool", "min_tokens": "int",
    "skip_special_tokens": "bool",
}


@dataclass
class ServedModel:
    """What validation needs to know about the model being served."""

    names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    generation_defaults: dict


@dataclass
class CompletionRequest:
    model: str  # the name the client asked for (or the first served name)
    prompts: list  # strings or token-id lists, one per prompt
    params: SamplingParams
    echo: bool
    stream: bool
    include_usage: bool
    cache_salt: str | None = None  # requests with different salts never share cached KV pages
    prompt_only: bool = False  # max_tokens=0 with echo: the prompt (and its logprobs), no tokens


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # content flattened to strings
    add_generation_prompt: bool
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs
    stream: bool
    include_usage: bool
    cache_salt: str | None = None


def check_model(fields: Fields, model: ServedModel) -> str:
    name = fields.get("model", "str")
    if name is not None and name not in model.names:
        raise APIError(f"The model `{name}` does not exist.", status=404, param="model",
                       code="model_not_found")
    return name or model.names[0]


def parse_completion(data: dict, model: ServedModel) -> CompletionRequest:
    fields = Fields(data)
    name = check_model(fields, model)
    prompt = data.get("prompt")
    if isinstance(prompt, str) or (is_token_ids(prompt) and prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or is_token_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError("'prompt' must be a string, an array of strings, an array of token ids, "
                       "or an array of token-id arrays (and not empty)", param="prompt")
    if fields.get("suffix", "str"):
        raise APIError("'suffix' is not supported", param="suffix")
    logprobs = fields.get("logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    echo = fields.get("echo", "bool", False)
    stream, include_usage = _stream_flags(fields)
    max_tokens = fields.get("max_tokens", "int")
    # echo + max_tokens=0 scores the prompt without generating (how lm-evaluation-harness asks for
    # log-likelihoods): the engine generates one token, which the response leaves out.
    prompt_only = max_tokens == 0
    if prompt_only and not echo:
        raise APIError("max_tokens=0 returns nothing without 'echo': true", param="max_tokens")
    if stream and echo and (prompt_only or logprobs is not None):
        raise APIError("'echo' with 'logprobs' or max_tokens=0 is not supported when streaming",
                       param="stream")
    best_of = fields.get("best_of", "int")
    if best_of is not None and best_of != fields.get("n", "int", 1):
        raise APIError("'best_of' other than 'n' is not supported", param="best_of")
    params = _sampling_params(fields, model, 1 if prompt_only else max_tokens, logprobs,
                              num_prompts=len(prompts),
                              prompt_logprobs=logprobs if echo else None)
    return CompletionRequest(name, prompts, params, echo, stream, include_usage,
                             fields.get("cache_salt", "str"), prompt_only)


def parse_chat(data: dict, model: ServedModel) -> ChatRequest:
    fields = Fields(data)
    name = check_model(fields, model)
    raw = fields.get("messages", "list")
    if not raw:
        raise APIError("'messages' must be a non-empty array of messages", param="messages")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    for field in ("tools", "functions"):
        if fields.get(field, "list"):
            raise APIError(f"'{field}' (tool calling) is not supported yet", param=field)
    response_format = fields.get("response_format", "object")
    if response_format and response_format.get("type", "text") != "text":
        raise APIError("only response_format {'type': 'text'} is supported", param="response_format")
    want_logprobs = fields.get("logprobs", "bool", False)
    top = fields.get("top_logprobs", "int")
    if top is not None:
        if not want_logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not 0 <= top <= MAX_LOGPROBS:
            raise APIError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}",
                           param="top_logprobs")
    top = (top or 0) if want_logprobs else None
    max_tokens = fields.get("max_completion_tokens", "int", fields.get("max_tokens", "int"))
    params = _sampling_params(fields, model, max_tokens, top, num_prompts=1)
    stream, include_usage = _stream_flags(fields)
    return ChatRequest(name, messages, fields.get("add_generation_prompt", "bool", True), params, top,
                       stream, include_usage, fields.get("cache_salt", "str"))


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool):
    """The chat template over validated messages: (token ids, text); template errors → 400."""
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except ValueError:
        raise
    except Exception as error:  # jinja errors from the template (e.g. role order rules)
        raise APIError(f"the chat template could not render these messages: {error}",
                       param="messages") from None


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(f"{param} must be an object with a string 'role'", param=param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise APIError(f"{param}.content: only text parts are supported", param=param)
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None and message["role"] == "assistant":
        content = ""
    elif not isinstance(content, str):
        raise APIError(f"{param}.content must be a string or an array of text parts", param=param)
    return {"role": message["role"], "content": content}


def _stream_flags(fields: Fields) -> tuple[bool, bool]:
    stream = fields.get("stream", "bool", False)
    options = fields.get("stream_options", "object")
    if options is not None and not stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true",
                       param="stream_options")
    include_usage = Fields(options or {}).get("include_usage", "bool", False)
    return stream, include_usage


def _sampling_params(fields: Fields, model: ServedModel, max_tokens, logprobs,
                     *, num_prompts: int, prompt_logprobs: int | None = None) -> SamplingParams:
    if max_tokens == 0:
        raise APIError("max_tokens must be at least 1 (max_tokens=0 scores a prompt only in "
                       "/v1/completions with 'echo': true)", param="max_tokens")
    if fields.get("logit_bias", "object"):
        raise APIError("'logit_bias' is not supported yet", param="logit_bias")
    kwargs = {name: fields.get(name, kind) for name, kind in _SAMPLING_FIELDS.items()}
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    for name, value in sampling_defaults(model.generation_defaults).items():
        kwargs.setdefault(name, value)
    n = kwargs.get("n", 1)
    if _is_int(n) and n * num_prompts > MAX_N:
        raise APIError(f"at most {MAX_N} completions per request (prompts × n), got "
                       f"{n * num_prompts}", param="n")
    stop = kwargs.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    stop_ids = kwargs.get("stop_token_ids", [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS or any(not 0 <= t < model.vocab_size for t in stop_ids):
        raise APIError(f"'stop_token_ids' must hold at most {MAX_STOP_TOKEN_IDS} ids in "
                       f"[0, {model.vocab_size})", param="stop_token_ids")
    if kwargs.get("top_k", 0) > model.vocab_size:
        kwargs["top_k"] = model.vocab_size  # the same distribution; keeps it in int32
    if kwargs.get("min_tokens", 0) > model.max_model_len:
        raise APIError(f"'min_tokens' must not exceed the context length "
                       f"({model.max_model_len} tokens)", param="min_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, **kwargs)
    except ValueError as error:
        message = str(error)
        first = message.split(" ", 1)[0]
        raise APIError(message, param=first if first in _SAMPLING_FIELDS or first in (
            "max_tokens", "logprobs") else None) from None


def parse_tokenize(data: dict, model: ServedModel) -> dict:
    """{"prompt": str} or {"messages": [...]}, with add_special_tokens / add_generation_prompt."""
    fields = Fields(data)
    check_model(fields, model)
    if "messages" in data:
        raw = fields.get("messages", "list")
        if not raw:
            raise APIError("'messages' must be a non-empty array of messages", param="messages")
        return {"messages": [_message(m, i) for i, m in enumerate(raw)],
                "add_generation_prompt": fields.get("add_generation_prompt", "bool", True)}
    prompt = fields.get("prompt", "str")
    if prompt is None:
        raise APIError("'prompt' (a string) or 'messages' is required", param="prompt")
    return {"prompt": prompt, "add_special_tokens": fields.get("add_special_tokens", "bool", True)}


def parse_detokenize(data: dict, model: ServedModel) -> list[int]:
    fields = Fields(data)
    check_model(fields, model)
    tokens = fields.get("tokens", "int_list")
    if tokens is None or any(not 0 <= t < model.vocab_size for t in tokens):
        raise APIError(f"'tokens' must be an array of token ids in [0, {model.vocab_size})",
                       param="tokens")
    return tokens
