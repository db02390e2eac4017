"""`jaxpaged run-batch`: OpenAI batch lines in, exactly one result line per custom_id out, even
across a SIGKILL and a restart."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxpaged.batch import BatchRunner, finished_ids, read_lines
from jaxpaged.sampling_params import SamplingParams

ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "32",
                "--max-num-batched-tokens", "256", "--token-buckets", "64", "256",
                "--no-progress"]


def _completion(custom_id, prompt, max_tokens):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}}


def _chat(custom_id, content, max_tokens):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}],
                     "max_tokens": max_tokens, "temperature": 0}}


def _write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")


def _read_output(path) -> dict:
    by_id = {}
    for raw in open(path):
        line = json.loads(raw)
        assert line["custom_id"] not in by_id, f"duplicate output for {line['custom_id']}"
        by_id[line["custom_id"]] = line
    return by_id


def _text(line) -> str:
    choice = line["response"]["body"]["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


# ---- host-side pieces ----------------------------------------------------------------------------

def test_finished_ids_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "response": null}\n{"custom_id": "b", "resp')
    assert finished_ids(out) == {"a"}
    assert out.read_text() == '{"custom_id": "a", "response": null}\n'
    assert finished_ids(tmp_path / "missing.jsonl") == set()


def test_finished_ids_refuses_a_file_that_is_not_batch_output(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("some notes\n")
    with pytest.raises(ValueError, match="not a batch output line"):
        finished_ids(out)


def test_read_lines_names_bad_lines_by_number(tmp_path):
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, [_completion("x", "hi", 1), "{oops", "", {"custom_id": 7}, "[1, 2]"])
    got = [(custom_id, error is None) for custom_id, _, error in read_lines(path)]
    assert got == [("x", True), ("line-2", False), ("line-4", False), ("line-5", False)]


# ---- through the engine ----------------------------------------------------------------------------

def test_run_batch_answers_every_line(smollm2_llm, tmp_path):
    llm = smollm2_llm
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Water is made of"]
    lines = [_completion(f"c{i}", p, 6) for i, p in enumerate(prompts)]
    lines += [
        _chat("chat", "Name a color.", 6),
        {"custom_id": "two", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": prompts[:2], "max_tokens": 4, "temperature": 0, "echo": True}},
        {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}},
        {"custom_id": "field", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "top_p": "high"}},
        {"custom_id": "model", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "model": "not-this-model"}},
        {"custom_id": "stream", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "stream": True}},
        _completion("too-long", [1] * 600, 4),
        "{not json",
        _completion("c0", "a repeated custom_id is answered once", 2),
    ]
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(path, lines)
    summary = BatchRunner(llm.engine).run(path, out, use_tqdm=False)
    assert (summary.completed, summary.failed, summary.skipped) == (5, 7, 1)

    got = _read_output(out)
    assert set(got) == {"c0", "c1", "c2", "chat", "two", "url", "get", "field", "model", "stream",
                        "too-long", "line-12"}
    # The oracle: the offline API (itself checked against transformers in test_smollm2.py).
    expected = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    for i, output in enumerate(expected):
        assert _text(got[f"c{i}"]) == output.outputs[0].text
        assert got[f"c{i}"]["response"]["body"]["usage"]["completion_tokens"] == 6
    chat = llm.chat([{"role": "user", "content": "Name a color."}],
                    SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert _text(got["chat"]) == chat.outputs[0].text
    two = got["two"]["response"]["body"]["choices"]
    short = llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert [c["text"] for c in two] == [p + o.outputs[0].text for p, o in zip(prompts, short)]

    for custom_id in ("url", "get", "line-12"):
        assert got[custom_id]["response"] is None and got[custom_id]["error"]["message"]
    for custom_id, status in (("field", 400), ("model", 404), ("stream", 400), ("too-long", 400)):
        response = got[custom_id]["response"]
        assert response["status_code"] == status
        assert response["body"]["error"]["message"]
    assert "maximum context length is 512 tokens" in got["too-long"]["response"]["body"]["error"]["message"]
    assert not llm.engine.has_unfinished and llm.engine.pages.num_free_pages == llm.engine.pages.num_pages

    # Run again: everything is already answered, nothing is added.
    again = BatchRunner(llm.engine).run(path, out, use_tqdm=False)
    assert (again.completed, again.failed, again.skipped) == (0, 0, 13)
    assert len(out.read_text().splitlines()) == 12


def _run_batch_cmd(input_path, output_path):
    return [sys.executable, "-m", "jaxpaged.cli", "run-batch", "-i", str(input_path),
            "-o", str(output_path), *ENGINE_FLAGS]


def test_run_batch_survives_sigkill(smollm2_llm, tmp_path):
    """500 lines (some malformed); kill -9 mid-run, restart: one line per custom_id, and the same
    text as an uninterrupted run."""
    lines = []
    for i in range(500):
        if i % 50 == 7:
            lines.append("{\"custom_id\": \"broken-%d\"" % i)  # torn JSON
        elif i % 10 == 0:
            lines.append(_chat(f"r{i}", f"One word about {i}.", 2 + i % 4))
        else:
            lines.append(_completion(f"r{i}", f"Fact {i}:", 2 + i % 4))
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, lines)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    reference = tmp_path / "reference.jsonl"
    BatchRunner(smollm2_llm.engine).run(path, reference, use_tqdm=False)
    expected = _read_output(reference)
    assert len(expected) == 500

    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(_run_batch_cmd(path, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out.exists() and out.read_text().count("\n") >= 100):
        assert process.poll() is None, "run-batch ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    num_before = out.read_text().count("\n")
    assert num_before < 500, "the kill came too late to test a resume"

    subprocess.run(_run_batch_cmd(path, out), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = _read_output(out)  # asserts no custom_id twice
    assert set(got) == set(expected)
    for custom_id, line in expected.items():
        if line["response"] is None:
            assert got[custom_id]["response"] is None
        else:
            assert got[custom_id]["response"]["status_code"] == 200
            assert _text(got[custom_id]) == _text(line), custom_id
