"""Prefix caching on vs off (issue 7), on top of `jaxpaged.bench`: a shared-prefix workload and a
workload of the same sizes with nothing shared.

shared-prefix: G groups x R requests sharing a P-token prefix, each adding a unique U-token suffix
and generating O tokens (EOS ignored); no-sharing: `random` prompts of P + U tokens. Each runs
offline (all requests submitted at once) on an engine with prefix caching on, then off.

    python3 benchmarks/prefix_cache.py                 # CPU, SmolLM2 float32 (default sizes)
    python3 benchmarks/prefix_cache.py --smoke         # seconds; exercises the code
    jaxpaged bench throughput --dataset shared-prefix ...   # the same workload, one engine
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpaged.bench.datasets import random_requests, shared_prefix_requests  # noqa: E402
from jaxpaged.bench.throughput import engine_summary, run_offline  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
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

    rows, engines = {}, {}
    for caching in (True, False):
        llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format,
                  max_num_seqs=args.max_num_seqs,
                  max_model_len=args.prefix_len + args.suffix_len + args.output_len + 16,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=caching)
        vocab = llm.engine.model_config.vocab_size
        count = args.groups * args.per_group
        workloads = {
            "shared-prefix": shared_prefix_requests(args.groups, args.per_group, args.prefix_len,
                                                    args.suffix_len, args.output_len, vocab, args.seed),
            "no-sharing": random_requests(count, args.prefix_len + args.suffix_len, args.output_len,
                                          0.0, vocab, args.seed + 1)}
        engines[f"caching={'on' if caching else 'off'}"] = engine_summary(llm.engine)
        for name, requests in workloads.items():
            key = f"{name} caching={'on' if caching else 'off'}"
            result = rows[key] = run_offline(llm.engine, requests, ignore_eos=True, request_prefix=key)
            print(f"{name:14s} caching={'on ' if caching else 'off'} | {result['output_throughput']:7.1f} "
                  f"out tok/s {result['total_token_throughput']:8.1f} total tok/s | TTFT mean "
                  f"{result['mean_ttft_ms']:7.0f} ms median {result['median_ttft_ms']:7.0f} ms | "
                  f"hit rate {result['prefix_cache_hit_rate']:.2f}", flush=True)
        del llm
    on, off = rows["shared-prefix caching=on"], rows["shared-prefix caching=off"]
    plain_on, plain_off = rows["no-sharing caching=on"], rows["no-sharing caching=off"]
    summary = {"shared_prefix_speedup": on["total_token_throughput"] / off["total_token_throughput"],
               "shared_prefix_ttft_ratio": off["mean_ttft_ms"] / on["mean_ttft_ms"],
               "no_sharing_slowdown": 1 - plain_on["total_token_throughput"] / plain_off["total_token_throughput"]}
    print(f"shared-prefix: {summary['shared_prefix_speedup']:.2f}x throughput, "
          f"{summary['shared_prefix_ttft_ratio']:.2f}x lower mean TTFT; "
          f"no-sharing slowdown {100 * summary['no_sharing_slowdown']:+.1f}%")
    if not args.smoke:
        report = {"command": "python3 benchmarks/prefix_cache.py " + " ".join(argv or sys.argv[1:]),
                  "engines": engines, "args": vars(args), "rows": rows, "summary": summary}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
