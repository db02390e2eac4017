"""The OpenAI-compatible HTTP app: Starlette routes over one AsyncEngine.

    HTTP body ─► protocol (validate → SamplingParams) ─► prompts (tokenize / chat template)
             ─► AsyncEngine.add ─► outputs ─► responses (choices, logprobs, usage) ─► JSON / SSE

Every error leaves as OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
A client that disconnects cancels its handler, which aborts its requests and frees their pages.
"""

import asyncio
import contextlib
import hmac
import logging
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import jaxpaged
from jaxpaged.prompts import encode_prompts
from jaxpaged.server import responses as fmt
from jaxpaged.server.async_engine import (AsyncEngine, EngineError, EngineOverloaded,
                                          EngineUnavailable)
from jaxpaged.server.fingerprint import system_fingerprint
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.protocol import (APIError, ServedModel, parse_chat, parse_completion,
                                      parse_detokenize, parse_json, parse_tokenize,
                                      render_messages)

logger = logging.getLogger("jaxpaged.server")

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_SECONDS = 1


class ClientDisconnected(Exception):
    pass


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):  # the engine's own checks (SamplingParams, add_request)
        return APIError(str(error))
    if isinstance(error, EngineOverloaded):
        return APIError(str(error), status=503, type="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, EngineUnavailable):
        return APIError(str(error), status=503, type="service_unavailable")
    if not isinstance(error, EngineError):
        logger.exception("unexpected error", exc_info=error)
    return APIError(str(error) or "internal error", status=500, type="internal_server_error")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def run_until_disconnect(receive, awaitable):
    """Awaits `awaitable`; if the client disconnects first, cancels it and raises ClientDisconnected.

    Once the body is read, uvicorn's `receive()` only returns when the client goes away, so a
    task blocked on it is a disconnect signal without polling.
    """
    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if not work.done() or work.cancelled():
        raise ClientDisconnected
    return work.result()


class EventStream:
    """An SSE response whose body generator is cancelled (and closed) when the client leaves."""

    def __init__(self, events):
        self.events = events

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})

        async def body():
            async with contextlib.aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with contextlib.suppress(ClientDisconnected, OSError):
            await run_until_disconnect(receive, body())


class OpenAIServer:
    def __init__(self, async_engine: AsyncEngine, *, served_model_names: list[str] | None = None,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 compile_count=None):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.tokenizer = engine.tokenizer
        names = tuple(served_model_names or [engine.source.name])
        self.served = ServedModel(names, engine.max_model_len, engine.model_config.vocab_size,
                                  dict(engine.generation_defaults))
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.fingerprint = system_fingerprint(engine)
        self.metrics = ServerMetrics(names[0])
        self.metrics.watch(lambda: async_engine.stats)
        self.metrics.watch_compiles(engine.num_compiles, compile_count)
        async_engine.metrics = self.metrics
        self.token_text = fmt.TokenText(self.tokenizer)
        self.created = int(time.time())

    def app(self) -> Starlette:
        def route(path, handler, method, *, open_=False):
            async def endpoint(request: Request):
                try:
                    if not open_:
                        self._check_key(request)
                    return await handler(request)
                except ClientDisconnected:
                    return Response(status_code=499)
                except Exception as error:
                    return error_response(as_api_error(error))
            return Route(path, endpoint, methods=[method])

        async def http_error(request, error: HTTPException):
            return error_response(APIError(error.detail, status=error.status_code,
                                           type="not_found_error" if error.status_code == 404
                                           else "invalid_request_error"))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.async_engine.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.async_engine.shutdown)

        return Starlette(routes=[
            route("/v1/completions", self.completions, "POST"),
            route("/v1/chat/completions", self.chat_completions, "POST"),
            route("/v1/models", self.models, "GET"),
            route("/tokenize", self.tokenize, "POST"),
            route("/detokenize", self.detokenize, "POST"),
            route("/health", self.health, "GET", open_=True),
            route("/metrics", self.prometheus, "GET", open_=True),
            route("/version", self.version, "GET", open_=True),
        ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)

    # ---- plumbing ------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
            raise APIError("invalid or missing API key", status=401, type="authentication_error",
                           code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        too_large = APIError(f"the request body exceeds {self.max_body_bytes} bytes", status=413)
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError("invalid Content-Length header")
            if int(length) > self.max_body_bytes:
                raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        return parse_json(bytes(body))

    def _envelope(self, object_: str, response_id: str, model: str) -> dict:
        return {"id": response_id, "object": object_, "created": int(time.time()), "model": model,
                "system_fingerprint": self.fingerprint}

    async def _submit(self, request_id: str, token_lists, texts, params, arrival: float,
                      cache_salt: str | None = None):
        """Adds every prompt as one engine request, all or nothing; returns their streams."""
        engine, total = self.async_engine, len(token_lists)
        results = await asyncio.gather(*(
            engine.add(f"{request_id}-{i}", tokens, params, text, arrival=arrival,
                       count_as=total - i, cache_salt=cache_salt)
            for i, (tokens, text) in enumerate(zip(token_lists, texts))), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for stream in results:
                if not isinstance(stream, BaseException):
                    engine.close(stream)
            raise errors[0]
        return results

    async def _merged(self, streams):
        """(prompt index, RequestOutput) from all streams as they come; closing aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, stream):
            try:
                async for output in self.async_engine.outputs(stream):
                    queue.put_nowait((index, output))
                queue.put_nowait((index, None))
            except Exception as error:
                queue.put_nowait((index, error))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for stream in streams:
                self.async_engine.close(stream)
            for task in tasks:
                task.cancel()

    async def _final_outputs(self, streams) -> list:
        final = [None] * len(streams)
        async with contextlib.aclosing(self._merged(streams)) as outputs:
            async for index, output in outputs:
                final[index] = output
        return final

    async def _events(self, payloads):
        """SSE bytes from payload dicts; an error mid-stream becomes one error event, then the end."""
        try:
            async with contextlib.aclosing(payloads) as payloads:
                async for payload in payloads:
                    yield fmt.sse(payload)
            yield fmt.SSE_DONE
        except Exception as error:
            yield fmt.sse(as_api_error(error).body())

    # ---- completions ---------------------------------------------------------------------------

    async def completions(self, request: Request):
        arrival = time.monotonic()
        body = parse_completion(await self._json(request), self.served)
        token_lists, texts, _ = encode_prompts(self.tokenizer, body.prompts)
        if body.echo:
            texts = [t if t is not None else self.tokenizer.decode(ids)
                     for t, ids in zip(texts, token_lists)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        model = body.model
        streams = await self._submit(request_id, token_lists, texts, body.params, arrival,
                                     body.cache_salt)
        envelope = self._envelope("text_completion", request_id, model)
        num_prompt_tokens = sum(map(len, token_lists))
        if body.stream:
            return EventStream(self._events(self._stream_completion(
                streams, envelope, body, texts, num_prompt_tokens)))
        finals = await run_until_disconnect(request.receive, self._final_outputs(streams))
        choices, num_generated = fmt.completion_choices(finals, texts, body, self.token_text)
        return JSONResponse({**envelope, "choices": choices,
                             "usage": fmt.usage(num_prompt_tokens, num_generated)})

    async def _stream_completion(self, streams, envelope, body, texts, num_prompt_tokens):
        n, k = body.params.n, body.params.logprobs
        holdback = max(map(len, body.params.stop_strings), default=1) - 1
        states = {}
        offsets = {}
        num_generated = 0
        extra = {"usage": None} if body.include_usage else {}
        if body.echo:
            for p, text in enumerate(texts):
                for i in range(n):
                    offsets[p * n + i] = len(text)
                    yield {**envelope, "choices": [{"index": p * n + i, "text": text,
                                                    "logprobs": None, "finish_reason": None}], **extra}
        async with contextlib.aclosing(self._merged(streams)) as outputs:
            async for p, output in outputs:
                for c in output.outputs:
                    index = p * n + c.index
                    state = states.setdefault(index, fmt.ChoiceStream(holdback))
                    step = state.advance(c)
                    if step is None:
                        continue
                    piece, first, finish = step
                    logprobs = None
                    if k is not None:
                        logprobs, offsets[index] = fmt.completion_logprobs(
                            c.logprobs[first:], c.token_ids[first:], k, self.token_text,
                            offsets.get(index, 0))
                    if finish is not None:
                        num_generated += len(c.token_ids)
                    yield {**envelope, "choices": [{
                        "index": index, "text": piece, "logprobs": logprobs,
                        "finish_reason": finish,
                        "stop_reason": c.stop_reason if finish else None}], **extra}
        if body.include_usage:
            yield {**envelope, "choices": [], "usage": fmt.usage(num_prompt_tokens, num_generated)}

    # ---- chat ----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        arrival = time.monotonic()
        body = parse_chat(await self._json(request), self.served)
        token_ids, text = render_messages(self.tokenizer, body.messages, body.add_generation_prompt)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model = body.model
        streams = await self._submit(request_id, [token_ids], [text], body.params, arrival,
                                     body.cache_salt)
        envelope = self._envelope("chat.completion", request_id, model)
        if body.stream:
            envelope["object"] = "chat.completion.chunk"
            return EventStream(self._events(self._stream_chat(
                streams, envelope, body, len(token_ids))))
        (output,) = await run_until_disconnect(request.receive, self._final_outputs(streams))
        choices, num_generated = fmt.chat_choices(output, body.top_logprobs, self.token_text)
        return JSONResponse({**envelope, "choices": choices,
                             "usage": fmt.usage(len(token_ids), num_generated)})

    def _chat_logprobs(self, body, entries, token_ids):
        if body.top_logprobs is None:
            return None
        return fmt.chat_logprobs(entries, token_ids, body.top_logprobs, self.token_text)

    async def _stream_chat(self, streams, envelope, body, num_prompt_tokens):
        holdback = max(map(len, body.params.stop_strings), default=1) - 1
        extra = {"usage": None} if body.include_usage else {}
        for i in range(body.params.n):
            yield {**envelope, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra}
        states = [fmt.ChoiceStream(holdback) for _ in range(body.params.n)]
        num_generated = 0
        async with contextlib.aclosing(self._merged(streams)) as outputs:
            async for _, output in outputs:
                for c in output.outputs:
                    step = states[c.index].advance(c)
                    if step is None:
                        continue
                    piece, first, finish = step
                    if finish is not None:
                        num_generated += len(c.token_ids)
                    yield {**envelope, "choices": [{
                        "index": c.index, "delta": {"content": piece} if piece else {},
                        "logprobs": self._chat_logprobs(body, c.logprobs[first:] if c.logprobs else None,
                                                        c.token_ids[first:]),
                        "finish_reason": finish,
                        "stop_reason": c.stop_reason if finish else None}], **extra}
        if body.include_usage:
            yield {**envelope, "choices": [], "usage": fmt.usage(num_prompt_tokens, num_generated)}

    # ---- the rest ------------------------------------------------------------------------------

    async def models(self, request: Request):
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "jaxpaged",
                  "root": self.async_engine.engine.source.name,
                  "max_model_len": self.served.max_model_len} for name in self.served.names]
        return JSONResponse({"object": "list", "data": cards})

    async def tokenize(self, request: Request):
        body = parse_tokenize(await self._json(request), self.served)
        if "messages" in body:
            tokens, _ = render_messages(self.tokenizer, body["messages"], body["add_generation_prompt"])
        else:
            tokens = self.tokenizer(body["prompt"],
                                    add_special_tokens=body["add_special_tokens"]).input_ids
        return JSONResponse({"count": len(tokens), "max_model_len": self.served.max_model_len,
                             "tokens": tokens})

    async def detokenize(self, request: Request):
        tokens = parse_detokenize(await self._json(request), self.served)
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})

    async def health(self, request: Request):
        if not self.async_engine.healthy:
            raise APIError("the engine is not running", status=503, type="service_unavailable")
        return Response(status_code=200)

    async def prometheus(self, request: Request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def version(self, request: Request):
        return JSONResponse({"version": jaxpaged.__version__,
                             "system_fingerprint": self.fingerprint})


def build_app(async_engine: AsyncEngine, **options) -> Starlette:
    """The Starlette app; its lifespan starts and stops the engine thread."""
    return OpenAIServer(async_engine, **options).app()
