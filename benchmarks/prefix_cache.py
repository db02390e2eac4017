"""Prefix caching on vs off: a shared-prefix workload and a workload with no sharing.

shared-prefix: G groups x R requests; each group shares a system prompt of P tokens, each request
adds a unique suffix of U tokens and generates O tokens (EOS ignored). Requests of a group arrive
together; the engine runs with prefix caching on and then off, on identical token ids.
no-sharing: the same sizes with every prompt unique, to show what caching costs when it can't help.
Reports throughput, mean/median TTFT (from submission) and the prefix-cache hit rate.

    python3 benchmarks/prefix_cache.py                 # CPU, SmolLM2 float32 (default sizes)
    python3 benchmarks/prefix_cache.py --smoke         # seconds; exercises the code
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def workloads(groups: int, per_group: int, prefix: int, suffix: int, seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    shared = []
    for _ in range(groups):
        system = rng.integers(100, vocab, prefix).tolist()
        shared += [system + rng.integers(100, vocab, suffix).tolist() for _ in range(per_group)]
    unique = [rng.integers(100, vocab, prefix + suffix).tolist() for _ in range(groups * per_group)]
    return {"shared-prefix": shared, "no-sharing": unique}


def run(llm, prompts, output_len: int) -> dict:
    from jaxpaged import SamplingParams

    engine = llm.engine
    hits0, queries0 = engine.scheduler.prefix_cache_hits, engine.scheduler.prefix_cache_queries
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    first_token = {}
    while engine.has_unfinished:
        for output in engine.step():
            first_token.setdefault(output.request_id, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    ttft = np.array(list(first_token.values()))
    hits = engine.scheduler.prefix_cache_hits - hits0
    queries = engine.scheduler.prefix_cache_queries - queries0
    return {"seconds": elapsed, "output_tok_s": len(prompts) * output_len / elapsed,
            "total_tok_s": (sum(map(len, prompts)) + len(prompts) * output_len) / elapsed,
            "ttft_mean_ms": 1e3 * ttft.mean(), "ttft_median_ms": 1e3 * float(np.median(ttft)),
            "hit_rate": hits / queries if queries else 0.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "prefix_cache_cpu.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.groups, args.per_group, args.prefix_len, args.suffix_len, args.output_len = 2, 2, 48, 8, 2
        args.max_num_seqs, args.max_num_batched_tokens = 4, 32  # budget < prompt: later requests hit

    from jaxpaged import LLM

    rows = {}
    for caching in (True, False):
        llm = LLM(args.model, dtype="float32", max_num_seqs=args.max_num_seqs,
                  max_model_len=args.prefix_len + args.suffix_len + args.output_len + 16,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=caching)
        vocab = llm.engine.model_config.vocab_size
        for name, prompts in workloads(args.groups, args.per_group, args.prefix_len,
                                       args.suffix_len, args.seed, vocab).items():
            result = run(llm, prompts, args.output_len)
            rows[f"{name} caching={'on' if caching else 'off'}"] = result
            print(f"{name:14s} caching={'on ' if caching else 'off'} | {result['output_tok_s']:7.1f} out tok/s "
                  f"{result['total_tok_s']:8.1f} total tok/s | TTFT mean {result['ttft_mean_ms']:7.0f} ms "
                  f"median {result['ttft_median_ms']:7.0f} ms | hit rate {result['hit_rate']:.2f}", flush=True)
        del llm
    on, off = rows["shared-prefix caching=on"], rows["shared-prefix caching=off"]
    plain_on, plain_off = rows["no-sharing caching=on"], rows["no-sharing caching=off"]
    summary = {"shared_prefix_speedup": on["total_tok_s"] / off["total_tok_s"],
               "shared_prefix_ttft_ratio": off["ttft_mean_ms"] / on["ttft_mean_ms"],
               "no_sharing_slowdown": 1 - plain_on["total_tok_s"] / plain_off["total_tok_s"]}
    print(f"shared-prefix: {summary['shared_prefix_speedup']:.2f}x throughput, "
          f"{summary['shared_prefix_ttft_ratio']:.2f}x lower mean TTFT; "
          f"no-sharing slowdown {100 * summary['no_sharing_slowdown']:+.1f}%")
    if not args.smoke:
        import jax

        report = {"command": "python3 benchmarks/prefix_cache.py " + " ".join(argv or sys.argv[1:]),
                  "device": str(jax.devices()[0]), "args": vars(args), "rows": rows, "summary": summary}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
