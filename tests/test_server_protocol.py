"""Request validation without a server: fields that reach the engine (host-only, fast)."""

import pytest

from jaxpaged.server.protocol import APIError, ServedModel, parse_chat, parse_completion

MODEL = ServedModel(names=("m",), max_model_len=128, vocab_size=1000, generation_defaults={})


def test_cache_salt_reaches_the_request():
    assert parse_completion({"prompt": "hi", "cache_salt": "tenant"}, MODEL).cache_salt == "tenant"
    assert parse_completion({"prompt": "hi"}, MODEL).cache_salt is None
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}], "cache_salt": "t"}, MODEL)
    assert chat.cache_salt == "t"
    with pytest.raises(APIError):
        parse_completion({"prompt": "hi", "cache_salt": 5}, MODEL)
