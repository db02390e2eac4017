"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1 driven by `openai` and httpx.

One engine (SmolLM2, small config) serves the whole module. Greedy references come from the offline
API on that same engine before the server takes it over, so server and `LLM` are compared on
identical numerics.
"""

import asyncio
import json
import re
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from jaxpaged import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2"
API_KEY = "test-key"
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                   token_buckets=(16, 64))
PROMPT = "Write a short story about a robot who learns to paint."
PROMPT_2 = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, max_tokens=24)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    from jaxpaged import LLM

    return LLM(**ENGINE_ARGS)


@pytest.fixture(scope="module")
def references(llm):
    """Offline greedy runs, taken before the server owns the engine."""
    completions = llm.generate([PROMPT, PROMPT_2], SamplingParams(ignore_eos=True, **GREEDY),
                               use_tqdm=False)
    long = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0]
    chat = llm.chat(MESSAGES, SamplingParams(**GREEDY), use_tqdm=False)[0]
    scored = llm.generate([PROMPT, PROMPT_2], SamplingParams(temperature=0, max_tokens=4,
                                                             ignore_eos=True, logprobs=1,
                                                             prompt_logprobs=1), use_tqdm=False)
    return {"completions": completions, "long": long, "chat": chat, "scored": scored}


class Served:
    def __init__(self, server, thread, engine, tokenizer):
        self.server, self.thread, self.engine, self.tokenizer = server, thread, engine, tokenizer
        self.url = f"http://127.0.0.1:{server.config.port}"
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def http(self):
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            match = re.match(r'^(jaxpaged:[\w:]+)(\{[^}]*\})? (\S+)$', line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
                key = match.group(1) + "".join(f"[{v}]" for k, v in sorted(labels.items())
                                               if k != "model_name")
                values[key] = float(match.group(3))
        return values

    def wait_idle(self, timeout=30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["jaxpaged:num_requests_running"], m["jaxpaged:num_requests_waiting"],
                    m["jaxpaged:kv_cache_usage_perc"]) == (0, 0, 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(llm, references):
    from jaxpaged.server.serve import build_server

    server = build_server(llm.engine, host="127.0.0.1", port=free_port(), api_key=API_KEY,
                          served_model_names=[MODEL, "alias"], max_waiting_requests=24,
                          log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield Served(server, thread, llm.engine, llm.get_tokenizer())
    server.should_exit = True
    thread.join(30)


# ---- the happy paths -----------------------------------------------------------------------------

def test_models_health_version(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL, "alias"]
    assert all(m.max_model_len == 512 for m in models.data)
    assert httpx.get(served.url + "/health").status_code == 200  # open without a key
    version = httpx.get(served.url + "/version").json()
    assert re.fullmatch(r"fp_[0-9a-f]{12}", version["system_fingerprint"])
    out = served.client().completions.create(model="alias", prompt="Hi", max_tokens=2)
    assert out.system_fingerprint == version["system_fingerprint"] and out.model == "alias"


def test_chat_greedy_matches_llm(served, references):
    ref = references["chat"]
    expected_prompt = len(served.tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert expected_prompt == len(ref.prompt_token_ids)
    client = served.client()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    choice = out.choices[0]
    assert out.model == MODEL and out.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        expected_prompt, len(ref.outputs[0].token_ids), expected_prompt + len(ref.outputs[0].token_ids))

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        ref.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_greedy_match_llm(served, references):
    refs = references["completions"]
    client = served.client()
    out = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT_2],
                                    extra_body={"ignore_eos": True}, **GREEDY)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        r.outputs[0].text for r in refs]
    prompt_tokens = sum(len(served.tokenizer(p).input_ids) for p in (PROMPT, PROMPT_2))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 2 * GREEDY["max_tokens"]

    # Token-id prompts, echo, and streaming give the same text.
    ids = refs[0].prompt_token_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, echo=True,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    assert by_ids.choices[0].text == served.tokenizer.decode(ids) + refs[0].outputs[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                            extra_body={"ignore_eos": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == refs[0].outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_and_seed(served):
    client = served.client()
    kwargs = dict(model=MODEL, prompt=PROMPT, n=2, temperature=1.0, max_tokens=12, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=8, seed=1)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    fixed = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=5,
                                           extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 15


def test_stop_strings_never_streamed(served, references):
    full = references["long"].outputs[0].text
    for stop in (full[12:16], full[20:22]):
        expected = full[:full.index(stop)]
        chunks = list(served.client().completions.create(
            model=MODEL, prompt=PROMPT, temperature=0, max_tokens=40, stop=["never-there", stop],
            stream=True, extra_body={"ignore_eos": True}))
        pieces = [c.choices[0].text for c in chunks]
        assert "".join(pieces) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
        sent = ""
        for piece in pieces:  # no prefix of the streamed text ever contained the stop string
            sent += piece
            assert stop not in sent
        chat_chunks = served.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=20, stop="Paris", stream=True)
        assert "Paris" not in "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)


def test_logprobs(served):
    client = served.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    special = set(served.tokenizer.all_special_tokens)
    assert "".join(t for t in lp.tokens if t not in special) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob, abs=1e-5)
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the best token

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.8, seed=3,
                                          max_tokens=8, logprobs=True, top_logprobs=4,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 8
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.logprob <= values[0] + 1e-5 and bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.8,
                                              seed=3, max_tokens=8, logprobs=True, top_logprobs=4,
                                              stream=True, extra_body={"ignore_eos": True})
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_scores_prompt(served, references):
    """echo + max_tokens=0 + logprobs: lm-evaluation-harness's log-likelihood request."""
    client = served.client()
    out = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT_2], echo=True,
                                    max_tokens=0, logprobs=1)
    assert out.usage.completion_tokens == 0
    for choice, ref in zip(sorted(out.choices, key=lambda c: c.index), references["scored"]):
        ids = ref.prompt_token_ids
        lp = choice.logprobs
        assert choice.text == served.tokenizer.decode(ids)
        assert lp.tokens == [served.tokenizer.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(
            [entry[t] for t, entry in zip(ids[1:], ref.prompt_logprobs[1:])], abs=1e-5)
        assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]


def test_echo_logprobs_with_generation(served, references):
    ref = references["scored"][1]
    ids, generated = ref.prompt_token_ids, ref.outputs[0]
    out = served.client().completions.create(model=MODEL, prompt=PROMPT_2, echo=True, max_tokens=4,
                                             temperature=0, logprobs=1,
                                             extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.choices[0].text == served.tokenizer.decode(ids) + generated.text
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    expected = ([entry[t] for t, entry in zip(ids[1:], ref.prompt_logprobs[1:])]
                + [entry[t] for t, entry in zip(generated.token_ids, generated.logprobs)])
    # The references ran both prompts in one batch, the server this one alone: another bucket's
    # program, whose float32 sums may round differently (1.9e-5 seen on a 2-core CPU machine).
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_tokenize_detokenize(served):
    with served.http() as http:
        tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tokens["tokens"] == served.tokenizer(PROMPT).input_ids
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat["count"] == len(served.tokenizer.apply_chat_template(
            MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert text == {"prompt": PROMPT}


# ---- errors --------------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
BIG = 5 << 20

BAD_REQUESTS = [
    # (id, path, body (dict or raw bytes), headers, status, param or message fragment)
    ("invalid-json", C, b'{"model": ', None, 400, "not valid JSON"),
    ("json-array", C, b"[1, 2]", None, 400, "JSON object"),
    ("nan", C, b'{"prompt": "hi", "temperature": NaN}', None, 400, "not valid JSON"),
    ("no-prompt", C, {"model": MODEL}, None, 400, "prompt"),
    ("prompt-int", C, {"prompt": 5}, None, 400, "prompt"),
    ("prompt-empty-list", C, {"prompt": []}, None, 400, "prompt"),
    ("prompt-mixed", C, {"prompt": ["a", 3]}, None, 400, "prompt"),
    ("prompt-empty-string", C, {"prompt": ""}, None, 400, "at least one token"),
    ("token-out-of-vocab", C, {"prompt": [10**7]}, None, 400, "token ids"),
    ("max-tokens-str", C, {"prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("max-tokens-neg", C, {"prompt": "hi", "max_tokens": -1}, None, 400, "max_tokens"),
    ("max-tokens-zero", C, {"prompt": "hi", "max_tokens": 0}, None, 400, "echo"),
    ("max-tokens-huge", C, {"prompt": "hi", "max_tokens": 10**9}, None, 400,
     "maximum context length is 512 tokens"),
    ("prompt-too-long", C, {"prompt": [1] * 600, "max_tokens": 1}, None, 400,
     "maximum context length is 512 tokens"),
    ("temperature-neg", C, {"prompt": "hi", "temperature": -0.5}, None, 400, "temperature"),
    ("temperature-str", C, {"prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
    ("temperature-bool", C, {"prompt": "hi", "temperature": True}, None, 400, "temperature"),
    ("top-p-zero", C, {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("top-k-neg", C, {"prompt": "hi", "top_k": -5}, None, 400, "top_k"),
    ("n-zero", C, {"prompt": "hi", "n": 0}, None, 400, "n"),
    ("n-huge", C, {"prompt": "hi", "n": 1000}, None, 400, "n"),
    ("logprobs-big", C, {"prompt": "hi", "logprobs": 99}, None, 400, "logprobs"),
    ("logprobs-bool", C, {"prompt": "hi", "logprobs": True}, None, 400, "logprobs"),
    ("echo-logprobs-stream", C, {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True},
     None, 400, "streaming"),
    ("stop-ints", C, {"prompt": "hi", "stop": [1, 2]}, None, 400, "stop"),
    ("stop-token-neg", C, {"prompt": "hi", "stop_token_ids": [-1]}, None, 400, "stop_token_ids"),
    ("seed-str", C, {"prompt": "hi", "seed": "x"}, None, 400, "seed"),
    ("presence-big", C, {"prompt": "hi", "presence_penalty": 5}, None, 400, "presence_penalty"),
    ("repetition-zero", C, {"prompt": "hi", "repetition_penalty": 0}, None, 400,
     "repetition_penalty"),
    ("min-gt-max", C, {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, None, 400, "min_tokens"),
    ("stream-options-alone", C, {"prompt": "hi", "stream_options": {"include_usage": True}}, None,
     400, "stream_options"),
    ("logit-bias", C, {"prompt": "hi", "logit_bias": {"1": 5}}, None, 400, "logit_bias"),
    ("unknown-model", C, {"model": "gpt-9", "prompt": "hi"}, None, 404, "model"),
    ("chat-no-messages", CHAT, {"messages": []}, None, 400, "messages"),
    ("chat-unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400,
     "role"),
    ("chat-content-int", CHAT, {"messages": [{"role": "user", "content": 5}]}, None, 400,
     "messages[0]"),
    ("chat-message-str", CHAT, {"messages": ["hello"]}, None, 400, "messages[0]"),
    ("chat-top-without-logprobs", CHAT, {"messages": MESSAGES, "top_logprobs": 2}, None, 400,
     "top_logprobs"),
    ("chat-top-big", CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, None, 400,
     "top_logprobs"),
    ("chat-tools", CHAT, {"messages": MESSAGES, "tools": [{"type": "function"}]}, None, 400, "tools"),
    ("chat-huge-max", CHAT, {"messages": MESSAGES, "max_tokens": 600}, None, 400,
     "maximum context length is 512 tokens"),
    ("no-key", C, {"prompt": "hi"}, {"Authorization": ""}, 401, "API key"),
    ("wrong-key", C, {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, "API key"),
    ("too-large", C, {"prompt": "a" * BIG}, None, 413, "exceeds"),
    ("tokenize-nothing", "/tokenize", {}, None, 400, "prompt"),
    ("detokenize-neg", "/detokenize", {"tokens": [-5]}, None, 400, "tokens"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(served, case):
    _, path, body, headers, status, fragment = case
    with served.http() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"content-type": "application/json",
                                                              **(headers or {})})
        else:
            response = http.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] or fragment == error["param"], error


def test_other_errors_and_recovery(served):
    with served.http() as http:
        chunked = http.post(C, content=(b"x" * (1 << 20) for _ in range(5)))  # no Content-Length
        assert chunked.status_code == 413 and "error" in chunked.json()
        missing = http.get("/v1/nope")
        assert missing.status_code == 404 and missing.json()["error"]["message"]
        wrong_method = http.get(C)
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        # A stream that fails before it starts is a plain 400, not a broken stream.
        bad_stream = http.post(C, json={"prompt": "hi", "max_tokens": 10**6, "stream": True})
        assert bad_stream.status_code == 400 and "maximum context length" in bad_stream.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="bad", max_retries=0).models.list()
    out = served.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert out.usage.completion_tokens >= 1
    m = served.wait_idle()
    assert m["jaxpaged:kv_cache_usage_perc"] == 0


# ---- disconnects and overload --------------------------------------------------------------------

def test_disconnect_aborts_and_frees_pages(served):
    before = served.metrics()

    async def one(client, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 10}."}],
                "max_tokens": 32, "stream": True, "ignore_eos": True}
        chunks = 0
        async with client.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    assert "error" not in json.loads(line[6:])
                    chunks += 1
                    if i % 2 and chunks == 3:
                        return "dropped"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
        return "ended"

    async def impatient(client):  # not streamed: gives up long before 400 tokens are done
        try:
            await client.post(C, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400,
                                       "ignore_eos": True}, timeout=1.0)
        except httpx.TimeoutException:
            return "dropped"
        return "done"

    async def run():
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)),
                                        *(impatient(client) for _ in range(4)))

    results = asyncio.run(run())
    assert results.count("dropped") == 14 and results.count("done") == 10
    after = served.wait_idle()
    assert after["jaxpaged:num_requests_running"] == 0 and after["jaxpaged:num_requests_waiting"] == 0
    assert after["jaxpaged:kv_cache_usage_perc"] == 0
    aborted = "jaxpaged:request_success_total[abort]"
    assert after[aborted] - before.get(aborted, 0) == 14
    assert not served.engine.groups


def test_overload_gets_503_and_admitted_requests_complete(served):
    async_engine = served.server.async_engine
    prompt = served.tokenizer(PROMPT * 30).input_ids[:400]
    async_engine.max_waiting_requests = 4

    async def one(client):
        return await client.post(C, json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                          "ignore_eos": True})

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    try:
        responses = asyncio.run(burst())
    finally:
        async_engine.max_waiting_requests = 24
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 1 <= statuses.count(200) and statuses.count(503) >= 1
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "server_overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 2
    served.wait_idle()


def test_metrics(served):
    m = served.metrics()
    for name in ("jaxpaged:time_to_first_token_seconds_count",
                 "jaxpaged:inter_token_latency_seconds_count",
                 "jaxpaged:e2e_request_latency_seconds_count", "jaxpaged:prompt_tokens_total",
                 "jaxpaged:generation_tokens_total", "jaxpaged:request_success_total[length]",
                 "jaxpaged:request_success_total[stop]"):
            assert m[name] > 0, name
    assert "jaxpaged:num_preemptions_total" in m
    # The same prompts were sent many times: some of their tokens came from the prefix cache.
    assert m["jaxpaged:prefix_cache_queries_total"] >= m["jaxpaged:prefix_cache_hits_total"] > 0
    assert m["jaxpaged:warmup_programs"] == served.engine.num_compiles > 0
    # Counted from the server's start; this test process also runs the engine directly, so only
    # its presence is checked here (tests/test_benchmarks.py checks it is 0 in a server process).
    assert m["jaxpaged:compiles_after_warmup"] >= 0


def test_cli_serve_flags():
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "jaxpaged.cli", "serve", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-waiting-requests",
                 "--max-model-len", "--max-num-seqs"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, "-m", "jaxpaged.cli", "serve", "--max-waiting-requests",
                          "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "max-waiting-requests" in bad.stderr


# ---- last: graceful shutdown ---------------------------------------------------------------------

def test_zz_graceful_shutdown(served):
    """SIGTERM (uvicorn's handle_exit): in-flight streams end with an error event, pages are freed."""
    lines = []
    with served.http() as http:
        with http.stream("POST", C, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400,
                                          "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 2:
                    served.server.handle_exit(signal.SIGTERM, None)
    assert "error" in json.loads(lines[-1][6:]) and lines[-1] != "data: [DONE]"
    served.thread.join(30)
    assert not served.thread.is_alive()
    assert not served.server.async_engine._thread.is_alive()
    engine = served.engine
    assert not engine.has_unfinished and engine.pages.num_free_pages == engine.pages.num_pages
