"""Seeded synthetic workloads, as token ids (no tokenizer needed). Host-side, no JAX.

- `random`: input and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]
  (vLLM's `random` dataset); token ids uniform over [100, vocab_size) to stay clear of the
  special tokens most vocabularies put first.
- `sharegpt-like`: the length distribution of ShareGPT conversations without the data. ShareGPT's
  first turns, tokenized with a Llama tokenizer and filtered as vLLM's benchmark does, have mean
  prompt ≈ 220 and mean output ≈ 200 tokens with long right tails, so lengths are drawn
  log-normal: prompt ~ exp(N(ln 147, 0.9²)) (mean 220), output ~ exp(N(ln 146, 0.8²)) (mean 200),
  rounded and clipped to [4, max_input_len] / [4, max_output_len]. Token ids as in `random`.
- `shared-prefix`: `num_groups` groups of `requests_per_group`; each group shares a random prefix
  of `prefix_len` tokens (a long system prompt) and each request adds a unique `suffix_len`-token
  suffix. Requests of a group are consecutive.

The same arguments and seed always give the same requests.
"""

from dataclasses import dataclass

import numpy as np

DATASETS = ("random", "sharegpt-like", "shared-prefix")
FIRST_TOKEN_ID = 100  # ids below are special tokens in most vocabularies


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    inputs = _uniform_lengths(rng, input_len, range_ratio, num_prompts)
    outputs = _uniform_lengths(rng, output_len, range_ratio, num_prompts)
    return [BenchRequest(_token_ids(rng, n, vocab_size), int(m)) for n, m in zip(inputs, outputs)]


def sharegpt_like_requests(num_prompts: int, vocab_size: int, seed: int, max_input_len: int = 1024,
                           max_output_len: int = 1024) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    inputs = np.clip(np.rint(np.exp(rng.normal(np.log(147), 0.9, num_prompts))), 4, max_input_len)
    outputs = np.clip(np.rint(np.exp(rng.normal(np.log(146), 0.8, num_prompts))), 4, max_output_len)
    return [BenchRequest(_token_ids(rng, int(n), vocab_size), int(m)) for n, m in zip(inputs, outputs)]


def shared_prefix_requests(num_groups: int, requests_per_group: int, prefix_len: int,
                           suffix_len: int, output_len: int, vocab_size: int,
                           seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_groups):
        prefix = _token_ids(rng, prefix_len, vocab_size)
        requests += [BenchRequest(prefix + _token_ids(rng, suffix_len, vocab_size), output_len)
                     for _ in range(requests_per_group)]
    return requests


def make_requests(args, vocab_size: int) -> list[BenchRequest]:
    """The workload the `bench` flags (see `add_dataset_flags`) describe."""
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               vocab_size, args.seed)
    if args.dataset == "sharegpt-like":
        return sharegpt_like_requests(args.num_prompts, vocab_size, args.seed,
                                      max_input_len=args.max_input_len,
                                      max_output_len=args.max_output_len)
    return shared_prefix_requests(args.num_groups, args.requests_per_group, args.prefix_len,
                                  args.suffix_len, args.output_len, vocab_size, args.seed)


def add_dataset_flags(parser, *, seed_flag: bool = True) -> None:
    """Workload flags; without `seed_flag` the caller's own --seed (the engine's) seeds it."""
    group = parser.add_argument_group("workload")
    group.add_argument("--dataset", choices=DATASETS, default="random")
    group.add_argument("--num-prompts", type=int, default=100, help="random, sharegpt-like")
    group.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    group.add_argument("--output-len", type=int, default=128,
                       help="random, shared-prefix: output tokens per request")
    group.add_argument("--range-ratio", type=float, default=0.0,
                       help="random: lengths uniform in len*(1 -/+ ratio)")
    group.add_argument("--max-input-len", type=int, default=1024, help="sharegpt-like: clip")
    group.add_argument("--max-output-len", type=int, default=1024, help="sharegpt-like: clip")
    group.add_argument("--num-groups", type=int, default=32, help="shared-prefix")
    group.add_argument("--requests-per-group", type=int, default=16, help="shared-prefix")
    group.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix")
    group.add_argument("--suffix-len", type=int, default=100, help="shared-prefix")
    group.add_argument("--ignore-eos", action="store_true",
                       help="generate exactly each request's output length")
    if seed_flag:
        group.add_argument("--seed", type=int, default=0, help="workload seed")


def check_dataset_args(args) -> None:
    for name in ("num_prompts", "input_len", "output_len", "max_input_len", "max_output_len",
                 "num_groups", "requests_per_group", "prefix_len", "suffix_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")


def describe_workload(args) -> dict:
    """The flags that define the workload, for the JSON report."""
    keys = {"random": ("num_prompts", "input_len", "output_len", "range_ratio"),
            "sharegpt-like": ("num_prompts", "max_input_len", "max_output_len"),
            "shared-prefix": ("num_groups", "requests_per_group", "prefix_len", "suffix_len",
                              "output_len")}[args.dataset]
    return {"dataset": args.dataset, **{k: getattr(args, k) for k in keys},
            "ignore_eos": args.ignore_eos, "seed": args.seed}


def _uniform_lengths(rng, length: int, range_ratio: float, n: int) -> np.ndarray:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, n)


def _token_ids(rng, n: int, vocab_size: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab_size, int(n)).tolist()
