"""Requests as the host tracks them, and the outputs users get back. No JAX here."""

import enum
from dataclasses import dataclass, field

from jaxpaged.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler removes requests from its queues by object
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved: the user's seed, or one drawn from the engine's generator
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved against the context length
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or being computed)
    # Async scheduling: a token sampled by the step still running on the device, whose id the host
    # has not seen yet (0 or 1), and that step's batch row holding it.
    num_pending: int = 0
    pending_row: int = -1
    page_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    cache_salt: str | None = None  # requests with different salts never share cached pages
    page_hashes: list = field(default_factory=list)  # chained hashes of its full pages so far
    num_registered_pages: int = 0  # leading pages already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # Per generated token: (sampled logprob, [(token id, logprob), ...]) when logprobs are asked.
    logprobs: list = field(default_factory=list)
    # Per prompt position 1, 2, ...: {token id: logprob} when prompt_logprobs are asked. Kept across
    # preemption, so recomputed positions are not recorded twice.
    prompt_logprobs: list = field(default_factory=list)

    @property
    def stop_token_ids_under_min_tokens(self) -> list[int]:
        """Tokens the sampler must not pick before min_tokens: they would end the request."""
        ids = [] if self.params.ignore_eos else sorted(self.eos_token_ids)
        return ids + [t for t in self.params.stop_token_ids if t not in ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return self.num_tokens + self.num_pending

    @property
    def num_outputs_with_pending(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per token: {token id: logprob}, sampled token first
    finish_reason: str | None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Aligned with prompt_token_ids: None for the first token, then {token id: logprob} holding the
    # actual token and the top prompt_logprobs (vLLM's format); None when not asked for.
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class ScoreOutput:
    """`LLM.score` for one (context, continuation) pair: lm-evaluation-harness's loglikelihood."""

    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    is_greedy: bool  # every continuation token is the argmax at its position
    token_ids: list[int]  # the continuation's tokens
    token_logprobs: list[float]
