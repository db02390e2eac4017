"""Continuous-batching scheduler: which requests run this step, and how many tokens each.

Host-side, plain Python. Every step it fills a token budget (`max_num_batched_tokens`) under a
sequence cap (`max_num_seqs`): running requests first (a decode token, or the next chunk of a
prompt), then waiting requests in arrival order. When the page pool runs dry it preempts the newest
running request by recompute: its pages are freed and it goes back to the front of the queue, to
prefill its prompt plus what it had generated.

With prefix caching, a request admitted from the queue first takes the cached pages of its longest
cached prefix (whole pages, always leaving at least one token to compute, whose logits it needs),
and every page that becomes full is offered to the cache as soon as the step computing it is
dispatched, so a request admitted in a later step can share it. With `share_pages_within_step`
even a request admitted later in the same step can (where the attention op writes before it
reads).

A step's life: `schedule()` picks the batch, `commit(batch)` records it as running on the device
(its tokens count as computed; a request whose chunk reached its end has a token *pending*), and
`update(batch, token_ids)` records the sampled ids once they reach the host. Under async scheduling
the engine schedules and dispatches step N+1 before step N's ids arrive: a pending token is fed to
the device from step N's output, and a request that turns out to have stopped at step N simply has
its step N+1 result dropped.
"""

from collections import deque
from dataclasses import dataclass

from jaxpaged.pages import PageManager, page_hashes
from jaxpaged.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]  # decodes first, then prefill chunks
    num_new_tokens: list[int]  # tokens scheduled per request, aligned with `requests`
    num_preempted: int = 0
    # Set by `Scheduler.commit`: which rows sample a token, and each request's preemption count
    # then (a request preempted while the step ran gets its result dropped).
    samples: list[bool] | None = None
    epochs: list[int] | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, pages: PageManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, share_pages_within_step: bool = False):
        self.pages = pages
        # Requests admitted in one step may share the full pages an earlier one of them will
        # compute in that step: right only where the attention op writes every new token's K/V
        # before any query reads (the reference and GPU ops; the TPU kernel's decode call reads
        # before its prefill call writes).
        self.share_pages_within_step = share_pages_within_step
        self._uncommitted_pages: list[int] = []  # registered by `schedule`, not yet dispatched
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first; the last is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens served from cached pages

    # ---- admission and removal -------------------------------------------------------------

    def add(self, request: Request) -> None:
        total = request.num_prompt_tokens + request.max_tokens
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt must contain at least one token")
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens; the request "
                f"asks for {total} ({request.num_prompt_tokens} in the prompt, "
                f"{request.max_tokens} to generate)"
            )
        needed = self.pages.pages_needed(total, 0)
        if needed > self.pages.num_pages:
            raise ValueError(
                f"the request needs {needed} KV-cache pages but the cache holds only "
                f"{self.pages.num_pages}; lower max_tokens or give the cache more memory"
            )
        request.status = Status.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, reason: str, stop_reason=None) -> None:
        """Ends a request (stop, length or abort) wherever it is and frees its pages."""
        if request.finished:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        num_preempted = 0

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._ends_with_pending(request):
                i += 1  # its last token is still on the device; it finishes when that lands
                continue
            n = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            if not self._grow(request, request.num_computed_tokens + n):
                # Free pages by preempting the newest running request until this one fits.
                victim = self.running[-1]
                self._preempt(victim)
                num_preempted += 1
                if victim is request:
                    break
                continue
            scheduled.append((request, n))
            budget -= n
            i += 1

        # New requests only when nothing had to be preempted (they would just be evicted again).
        while (self.waiting and budget > 0 and not num_preempted
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            looked_up = self._take_cached_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow(request, request.num_computed_tokens + n):
                self._release(request)  # hand back the cached pages it took
                break
            self.prefix_cache_queries += looked_up
            self.prefix_cache_hits += request.num_computed_tokens
            request.num_cached_tokens = request.num_computed_tokens
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled.append((request, n))
            budget -= n
            if self.share_pages_within_step:  # nothing is preempted after this point of a step
                self._uncommitted_pages += self._register_full_pages(
                    request, request.num_computed_tokens + n)

        # Decodes first, then prefill chunks: the layout the attention kernels expect.
        scheduled.sort(key=lambda item: not self._is_decode(*item))
        return ScheduledBatch([r for r, _ in scheduled], [n for _, n in scheduled], num_preempted)

    def commit(self, batch: ScheduledBatch) -> None:
        """Records that `batch` is running: its tokens count as computed, and a request whose chunk
        reached the end of its tokens now has a sampled token pending."""
        batch.samples, batch.epochs = [], []
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            request.num_computed_tokens += n
            samples = request.num_computed_tokens == request.num_tokens_with_pending
            if samples:
                request.num_pending += 1
                request.pending_row = row
            batch.samples.append(samples)
            batch.epochs.append(request.num_preemptions)
            # Offered to the cache now, not when the ids come back: any later step that reads
            # these pages runs after this one has written them.
            self._register_full_pages(request)
        self._uncommitted_pages.clear()

    def drop_uncommitted(self) -> None:
        """The batch `schedule` returned will never run (its dispatch failed): forget the pages
        it registered for sharing, whose content will never be computed."""
        for page in self._uncommitted_pages:
            self.pages.unregister(page)
        self._uncommitted_pages.clear()

    def update(self, batch: ScheduledBatch, sampled_token_ids) -> list[Request]:
        """Records the step's results; returns the requests that received a new token.

        `sampled_token_ids[i]` belongs to `batch.requests[i]`; it is only real when that request's
        chunk reached the end of its tokens (a partial prefill chunk samples nothing). Commits the
        batch first if the caller did not.
        """
        if batch.samples is None:
            self.commit(batch)
        advanced = []
        for i, request in enumerate(batch.requests):
            if request.finished or request.num_preemptions != batch.epochs[i]:
                continue  # aborted, stopped or preempted while the step ran: nothing to record
            if batch.samples[i]:
                request.num_pending -= 1
                request.output_token_ids.append(int(sampled_token_ids[i]))
            self._register_full_pages(request)
            if batch.samples[i]:
                advanced.append(request)
                self._check_token_stop(request, request.output_token_ids[-1])
        return advanced

    # ---- internals ---------------------------------------------------------------------------

    @staticmethod
    def _is_decode(request: Request, n: int) -> bool:
        return n == 1 and request.num_computed_tokens == request.num_tokens_with_pending - 1

    def _ends_with_pending(self, request: Request) -> bool:
        """The pending token is the request's last (max_tokens or the context length)."""
        return request.num_pending > 0 and (
            request.num_outputs_with_pending >= request.max_tokens
            or request.num_tokens_with_pending >= self.max_model_len)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        needed = self.pages.pages_needed(num_tokens, len(request.page_ids))
        if needed > self.pages.num_free_pages:
            return False
        request.page_ids.extend(self.pages.allocate(needed))
        return True

    def _release(self, request: Request) -> None:
        self.pages.free(request.page_ids)
        request.page_ids = []
        request.num_computed_tokens = 0
        request.num_registered_pages = 0
        request.num_pending = 0  # a token still on the device is recomputed (or not needed)

    def _hashes(self, request: Request) -> list[bytes]:
        """The request's full-page hashes, extended to cover every token it knows."""
        known = request.page_hashes
        tokens = request.all_token_ids
        if len(known) < len(tokens) // self.pages.page_size:
            known.extend(page_hashes(tokens, self.pages.page_size, request.cache_salt,
                                     start=len(known), parent=known[-1] if known else b""))
        return known

    def _take_cached_prefix(self, request: Request) -> int:
        """Maps the longest cached prefix into a request holding no pages; returns tokens looked up."""
        if not self.pages.enable_prefix_caching or request.page_ids:
            return 0
        if request.params.prompt_logprobs is not None:
            return 0  # it needs the hidden state of every prompt position, so computes them all
        usable = (request.num_tokens - 1) // self.pages.page_size  # leave a token to compute
        hashes = self._hashes(request)[:usable]
        request.page_ids = self.pages.lookup(hashes)
        request.num_computed_tokens = len(request.page_ids) * self.pages.page_size
        request.num_registered_pages = len(request.page_ids)
        return len(hashes) * self.pages.page_size

    def _register_full_pages(self, request: Request, num_computed: int | None = None) -> list[int]:
        """Offers the request's full pages up to `num_computed` tokens (default: its computed
        ones) to the cache; returns the pages newly recorded."""
        if not self.pages.enable_prefix_caching:
            return []
        if num_computed is None:
            num_computed = request.num_computed_tokens
        # Only pages of tokens the host knows (a pending token's id is still on the device).
        full = min(num_computed, request.num_tokens) // self.pages.page_size
        registered = []
        if full > request.num_registered_pages:
            hashes = self._hashes(request)
            for i in range(request.num_registered_pages, full):
                if self.pages.register(request.page_ids[i], hashes[i]):
                    registered.append(request.page_ids[i])
            request.num_registered_pages = full
        return registered

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _check_token_stop(self, request: Request, token: int) -> None:
        num_output = len(request.output_token_ids)
        params = request.params
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return self.finish(request, "stop")
            if token in params.stop_token_ids:
                return self.finish(request, "stop", token)
        if num_output >= request.max_tokens or request.num_tokens >= self.max_model_len:
            self.finish(request, "length")
