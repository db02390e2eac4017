"""SamplingParams: how one request samples and stops, named and defaulted like vLLM's."""

from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20  # per-token top logprobs the device returns (OpenAI's limit)
GREEDY_TEMPERATURE = 1e-5  # temperatures below this are greedy (dividing by them overflows)
DRAW_KINDS = ("greedy", "random", "filtered")  # see `draw_kind`


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (0: only the sampled one)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (0: only the actual one)
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(_number(self.temperature) and self.temperature >= 0,
              f"temperature must be >= 0, got {self.temperature!r}")
        check(_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(isinstance(self.top_k, int) and self.top_k >= -1,
              f"top_k must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}")
        check(_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        check(_number(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                               and not isinstance(self.prompt_logprobs, bool)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        check(all(isinstance(s, str) and s for s in stop), "stop must be a string or a list of non-empty strings")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        check(all(isinstance(i, int) and i >= 0 for i in ids), "stop_token_ids must be non-negative integers")
        self.stop_token_ids = ids
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def filters(self) -> bool:
        """A sampled (not greedy) request that restricts the candidates: needs the sort."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fills fields the caller left at their class default from e.g. generation_config.json."""
        changes = {}
        for f in fields(self):
            if f.init and f.name in defaults and getattr(self, f.name) == f.default:
                changes[f.name] = defaults[f.name]
        if not changes:
            return self
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(changes)
        return SamplingParams(**values)


def draw_kind(params) -> str:
    """How a batch draws its tokens, decided on the host so the device program branches on
    nothing (a data-dependent branch makes the GPU runtime wait for its predicate, which blocks
    the host in dispatch): "greedy" (argmax only), "random" (some rows sample, none filters) or
    "filtered" (some sampled row uses top-k, top-p or min-p)."""
    params = list(params)
    if all(p.greedy for p in params):
        return "greedy"
    return "filtered" if any(p.filters for p in params) else "random"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
