"""The Engine behind an asyncio server: one thread owns it, the event loop talks to it by message.

The engine is not thread-safe, so exactly one thread (the engine thread) touches it. Handlers on
the event loop submit `add` / `abort` commands through a thread-safe queue; the thread runs
`Engine.step()` while there is work and blocks on that queue when there is none. Every
RequestOutput goes back to its handler with `loop.call_soon_threadsafe` into a per-request
asyncio.Queue, so nobody polls. Host-side: no JAX here (the Engine arrives built).
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from jaxpaged.request import RequestOutput
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger("jaxpaged.server")

_ACCEPTED = object()  # first message of a request the engine took


class EngineOverloaded(Exception):
    """The waiting queue is full: the client should retry later (HTTP 503)."""


class EngineUnavailable(Exception):
    """The engine is shutting down or has failed (HTTP 503)."""


class EngineError(Exception):
    """A step failed while the request was in flight (HTTP 500)."""


@dataclass
class EngineStats:
    """What the engine thread last saw; replaced whole, so readers never see a torn snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: "RequestStream"
    cache_salt: str | None = None


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass(eq=False)
class RequestStream:
    """The handler's end of one request: outputs arrive in `queue` (a RequestOutput or an error)."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    arrival: float  # time.monotonic() when the HTTP request arrived
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    pending: bool = False  # counted as waiting until its first output
    # Engine thread only: latency bookkeeping for metrics.
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_tokens: int = 0

    def post(self, item) -> None:
        """From the engine thread: hand `item` to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine, *, max_waiting_requests: int | None = None, metrics=None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._num_pending = 0  # event loop only: accepted requests without their first output
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)

    # ---- lifecycle (event loop / main thread) ---------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Stop admitting and abort everything in flight. Safe from a signal handler."""
        self._stopping = True
        self._commands.put(_Stop())  # SimpleQueue.put is reentrant: fine in a signal handler

    def shutdown(self, timeout: float = 30.0) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self._error is None

    # ---- requests (event loop) ---------------------------------------------------------------

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  prompt: str | None = None, *, arrival: float | None = None,
                  count_as: int = 1, cache_salt: str | None = None) -> RequestStream:
        """Submits one request; returns its stream once the engine accepted it.

        Raises the engine's ValueError (a bad request), EngineOverloaded or EngineUnavailable.
        `count_as` lets a caller reserve waiting-queue room for a batch it adds one by one.
        """
        if not self.healthy:
            raise EngineUnavailable("the server is shutting down" if self._stopping
                                    else "the engine is not running")
        limit = self.max_waiting_requests
        if limit is not None and self._num_pending + count_as > limit:
            raise EngineOverloaded(f"too many requests are waiting ({limit} at most); retry later")
        stream = RequestStream(request_id, asyncio.get_running_loop(), arrival or time.monotonic())
        self._num_pending += 1
        stream.pending = True
        try:
            self._commands.put(_Add(request_id, prompt_token_ids, params, prompt, stream, cache_salt))
            first = await stream.queue.get()
        except BaseException:
            self.close(stream)
            raise
        if first is not _ACCEPTED:
            stream.finished = True
            self._settle(stream)
            raise first
        return stream

    async def outputs(self, stream: RequestStream):
        """Yields the request's RequestOutputs (cumulative text) until it finishes.

        Leaving early (a disconnect cancels the consumer, or it stops iterating) aborts the request
        in the engine, which frees its pages.
        """
        try:
            while not stream.finished:
                item = await stream.queue.get()
                self._settle(stream)
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                stream.finished = item.finished
                yield item
        finally:
            self.close(stream)

    def close(self, stream: RequestStream) -> None:
        """Done with a stream: aborts its request unless it finished."""
        self._settle(stream)
        if not stream.finished:
            stream.finished = True
            self._commands.put(_Abort(stream.request_id))

    def _settle(self, stream: RequestStream) -> None:
        if stream.pending:
            stream.pending = False
            self._num_pending -= 1

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                # Block while idle; otherwise take whatever arrived during the last step.
                commands = [] if self.engine.has_unfinished else [self._commands.get()]
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if any(isinstance(c, _Stop) for c in commands):
                    self._fail_all(EngineUnavailable("the server is shutting down"), commands)
                    break
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished:
                    try:
                        outputs = self.engine.step()
                    except Exception as error:
                        # Fail the requests in flight (their pages are freed) and keep serving.
                        logger.exception("engine step failed")
                        self._fail_all(EngineError(f"the engine step failed: {error}"), [])
                        outputs = []
                    self._dispatch(outputs)
                self._publish_stats()
        except BaseException as error:  # a bug in the engine: fail loudly, leave no one hanging
            logger.exception("the engine thread failed")
            self._error = error
            self._fail_all(EngineUnavailable(f"the engine failed: {error}"), [])
        self._stopping = True
        # Whatever slipped in after the stop still gets an answer.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                command.stream.post(EngineUnavailable("the server is shutting down"))

    def _apply(self, command) -> None:
        engine = self.engine
        if isinstance(command, _Add):
            try:
                engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                   prompt=command.prompt, cache_salt=command.cache_salt)
            except ValueError as error:
                command.stream.post(error)
                return
            self._streams[command.request_id] = command.stream
            command.stream.post(_ACCEPTED)
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(command.prompt_token_ids))
        elif isinstance(command, _Abort):
            stream = self._streams.pop(command.request_id, None)
            if command.request_id in engine.groups:
                group = engine.groups[command.request_id]
                engine.abort(command.request_id)
                if self.metrics:
                    self.metrics.count_finished(["abort"] * len(group.sequences))
            if stream is not None and self.metrics:
                self.metrics.e2e_latency.observe(time.monotonic() - stream.arrival)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if self.metrics:
                self._record(stream, output, now)
            if output.finished:
                del self._streams[output.request_id]
            stream.post(output)

    def _record(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        metrics = self.metrics
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new = num_tokens - stream.num_tokens
        stream.num_tokens = num_tokens
        if new > 0:
            metrics.generation_tokens.inc(new)
            if stream.first_token_time is None:
                stream.first_token_time = now
                metrics.ttft.observe(now - stream.arrival)
            else:
                metrics.inter_token_latency.observe(now - stream.last_token_time)
            stream.last_token_time = now
        if output.finished:
            metrics.e2e_latency.observe(now - stream.arrival)
            metrics.count_finished([c.finish_reason for c in output.outputs])

    def _publish_stats(self) -> None:
        scheduler = self.engine.scheduler
        old = self.stats
        self.stats = EngineStats(len(scheduler.running), len(scheduler.waiting),
                                 self.engine.pages.usage, scheduler.num_preemptions,
                                 getattr(scheduler, "prefix_cache_queries", 0),
                                 getattr(scheduler, "prefix_cache_hits", 0))
        if self.metrics:
            for name in ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits"):
                grown = getattr(self.stats, name) - getattr(old, name)
                if grown > 0:
                    getattr(self.metrics, name).inc(grown)

    def _fail_all(self, error: Exception, commands: list) -> None:
        """Aborts every request (in flight or just submitted) and tells its handler why."""
        for command in commands:
            if isinstance(command, _Add):
                command.stream.post(error)
        for request_id, stream in list(self._streams.items()):
            try:
                self._apply(_Abort(request_id))
            except Exception:  # the engine may be broken; the handler must still hear back
                logger.exception("aborting %s failed", request_id)
            stream.post(error)
        self._streams.clear()
        try:
            self._publish_stats()
        except Exception:
            pass
