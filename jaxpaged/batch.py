"""`jaxpaged run-batch`: OpenAI Batch-format JSONL in, one result line per request out.

    input line ─► {custom_id, method, url, body} ─► protocol (validate → SamplingParams)
               ─► Engine.add_request … Engine.step ─► responses (choices, usage) ─► output line

The input is streamed, never loaded whole: at most `window` sequences wait in the engine, and
the next lines are read only as earlier ones finish. Each result is written as one line in the
order requests finish and flushed at once, so a killed run loses only the requests in flight.
On restart the custom_ids already in the output are skipped (a torn last line, from a kill in
the middle of a write, is cut off first): the run resumes with nothing lost or duplicated.

A line that cannot become a request (bad JSON, no custom_id, wrong method or url) gets a line
with `"response": null` and an `"error"`; a request the API would refuse (a bad field, a prompt
too long) gets OpenAI's 400 response with an error body. A line without a usable custom_id is
named `line-N` after its line number.
"""

import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from jaxpaged.prompts import encode_prompts
from jaxpaged.server import responses as fmt
from jaxpaged.server.fingerprint import system_fingerprint
from jaxpaged.server.protocol import APIError, ServedModel, parse_chat, parse_completion, render_messages

logger = logging.getLogger("jaxpaged.batch")

URLS = ("/v1/completions", "/v1/chat/completions")


class LineError(Exception):
    """This input line is not a batch request at all (no response body can be made)."""


@dataclasses.dataclass
class BatchSummary:
    completed: int = 0  # lines written with status 200
    failed: int = 0  # lines written with an error (400 response or a line error)
    skipped: int = 0  # custom_ids already in the output (resumed) or repeated in the input


@dataclasses.dataclass
class _Pending:
    """A request in the engine: what its output line needs once all its sequences finish."""

    custom_id: str
    kind: str  # "completion" | "chat"
    body: object  # the parsed CompletionRequest / ChatRequest
    texts: list  # prompt texts (echo)
    request_ids: list[str]  # one engine request per prompt
    num_prompt_tokens: int
    finals: dict = dataclasses.field(default_factory=dict)  # engine request id → RequestOutput


def finished_ids(output_path: Path) -> set[str]:
    """custom_ids already answered in `output_path`; cuts off a torn last line first."""
    if not output_path.exists():
        return set()
    with output_path.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # killed mid-write: drop the partial line, it will be redone
            f.truncate(end)
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{output_path}:{number} is not a batch output line; refusing to "
                             "append to it (use another output file)") from None
    return done


def read_lines(input_path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(custom_id, request, error) per non-blank input line, streamed."""
    with input_path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError as error:
                yield f"line-{number}", None, f"line {number} is not valid JSON: {error}"
                continue
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                yield f"line-{number}", None, f"line {number} has no string 'custom_id'"
                continue
            yield custom_id, line, None


def count_lines(input_path: Path) -> int:
    with input_path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


class BatchRunner:
    def __init__(self, engine, *, served_model_names: list[str] | None = None,
                 window: int | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        names = tuple(served_model_names or [engine.source.name])
        self.served = ServedModel(names, engine.max_model_len, engine.model_config.vocab_size,
                                  dict(engine.generation_defaults))
        self.fingerprint = system_fingerprint(engine)
        self.token_text = fmt.TokenText(self.tokenizer)
        # Enough waiting sequences to refill every free row of the batch, and no more.
        self.window = window or 2 * engine.config.max_num_seqs
        self._ids = itertools.count()

    def run(self, input_path: Path, output_path: Path, *, use_tqdm: bool = True) -> BatchSummary:
        input_path, output_path = Path(input_path), Path(output_path)
        if not input_path.is_file():
            raise FileNotFoundError(f"no input file {input_path}")
        resumed = finished_ids(output_path)
        seen: set[str] = set()
        summary = BatchSummary()
        pending: dict[str, _Pending] = {}  # engine request id → its batch request
        in_flight = 0  # sequences in the engine
        lines = read_lines(input_path)
        with output_path.open("a", encoding="utf-8") as out, tqdm(
                total=count_lines(input_path), desc="run-batch", unit="req",
                disable=not use_tqdm) as progress:

            def write(custom_id: str, response: dict | None, error: dict | None) -> None:
                status = response["status_code"] if response else None
                summary.completed += status == 200
                summary.failed += status != 200
                out.write(json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                                      "response": response, "error": error}) + "\n")
                out.flush()
                progress.update(1)

            for custom_id, line, error in itertools.chain(lines, [(None, None, None)]):
                if custom_id is not None:
                    if custom_id in resumed or custom_id in seen:
                        if custom_id in seen:
                            logger.warning("custom_id %r appears again in the input; skipped",
                                           custom_id)
                        summary.skipped += 1
                        progress.update(1)
                        continue
                    seen.add(custom_id)
                    if error is None:
                        try:
                            request = self._submit(custom_id, line)
                        except LineError as line_error:
                            error = str(line_error)
                        except (APIError, ValueError) as api_error:
                            write(custom_id, self._error_response(api_error), None)
                            continue
                    if error is not None:
                        write(custom_id, None, {"code": "invalid_request", "message": error})
                        continue
                    for request_id in request.request_ids:
                        pending[request_id] = request
                    in_flight += len(request.request_ids) * request.body.params.n
                    if in_flight < self.window:
                        continue  # read more lines before stepping
                # Step until there is room for the next line (or, at the end, until all are done).
                while pending and (custom_id is None or in_flight >= self.window):
                    for output in self.engine.step():
                        if not output.finished:
                            continue
                        request = pending.pop(output.request_id)
                        request.finals[output.request_id] = output
                        in_flight -= len(output.outputs)
                        if len(request.finals) == len(request.request_ids):
                            write(request.custom_id, self._response(request), None)
        return summary

    # ---- one request ---------------------------------------------------------------------------

    def _submit(self, custom_id: str, line: dict) -> _Pending:
        if line.get("method", "POST") != "POST":
            raise LineError(f"{custom_id}: 'method' must be POST")
        url = line.get("url")
        if url not in URLS:
            raise LineError(f"{custom_id}: 'url' must be one of {', '.join(URLS)}, got {url!r}")
        body = line.get("body")
        if not isinstance(body, dict):
            raise LineError(f"{custom_id}: 'body' must be a JSON object")
        if body.get("stream"):
            raise APIError("'stream' is not supported in batch requests", param="stream")
        if url == "/v1/completions":
            parsed = parse_completion(body, self.served)
            token_lists, texts, _ = encode_prompts(self.tokenizer, parsed.prompts)
            if parsed.echo:
                texts = [t if t is not None else self.tokenizer.decode(ids)
                         for t, ids in zip(texts, token_lists)]
            kind = "completion"
        else:
            parsed = parse_chat(body, self.served)
            token_ids, text = render_messages(self.tokenizer, parsed.messages,
                                              parsed.add_generation_prompt)
            token_lists, texts, kind = [token_ids], [text], "chat"
        base = f"b{next(self._ids)}"
        request_ids = [f"{base}.{i}" for i in range(len(token_lists))]
        try:
            for request_id, tokens, text in zip(request_ids, token_lists, texts):
                self.engine.add_request(request_id, tokens, parsed.params, prompt=text,
                                        cache_salt=parsed.cache_salt)
        except ValueError:
            for request_id in request_ids:  # all prompts of a request or none
                self.engine.abort(request_id)
            raise
        return _Pending(custom_id, kind, parsed, texts, request_ids, sum(map(len, token_lists)))

    def _response(self, request: _Pending) -> dict:
        finals = [request.finals[request_id] for request_id in request.request_ids]
        if request.kind == "completion":
            choices, num_generated = fmt.completion_choices(finals, request.texts, request.body,
                                                            self.token_text)
            prefix, object_ = "cmpl", "text_completion"
        else:
            choices, num_generated = fmt.chat_choices(finals[0], request.body.top_logprobs,
                                                      self.token_text)
            prefix, object_ = "chatcmpl", "chat.completion"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        body = {"id": response_id, "object": object_, "created": int(time.time()),
                "model": request.body.model, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": fmt.usage(request.num_prompt_tokens, num_generated)}
        return {"status_code": 200, "request_id": response_id, "body": body}

    @staticmethod
    def _error_response(error: Exception) -> dict:
        api_error = error if isinstance(error, APIError) else APIError(str(error))
        return {"status_code": api_error.status, "request_id": f"batch-{uuid.uuid4().hex}",
                "body": api_error.body()}
