"""The `jaxpaged bench` subcommands: flags here, work in the modules (imported when run)."""

import math
import os
import shlex
import sys

from jaxpaged.bench.datasets import add_dataset_flags


def add_bench_parser(commands, add_engine_flags, engine_kwargs) -> None:
    """Adds `bench throughput | serve | startup` under the CLI's subcommands."""
    bench = commands.add_parser("bench", help="benchmarks: throughput, serve, startup")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    throughput = kinds.add_parser("throughput", help="offline, in-process throughput")
    add_dataset_flags(throughput, seed_flag=False)  # --seed: the engine's, also the workload's
    throughput.add_argument("--output-json", default=None)
    add_engine_flags(throughput)
    throughput.set_defaults(handler=lambda args: _throughput(args, engine_kwargs(args)))

    serve = kinds.add_parser("serve", help="online, against an OpenAI-compatible server")
    add_dataset_flags(serve)
    serve.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="an OpenAI-compatible server (jaxpaged serve, vLLM, ...)")
    serve.add_argument("--model", default=None, help="model name to send (default: the first "
                       "of the server's /v1/models)")
    serve.add_argument("--request-rate", type=float, default=math.inf,
                       help="Poisson arrivals, requests/s (default: inf, all at once)")
    serve.add_argument("--max-concurrency", type=int, default=None,
                       help="at most this many requests in flight")
    serve.add_argument("--tokenizer", default=None,
                       help="send text prompts, decoded from the token ids with this tokenizer "
                            "(an HF directory or Hub name); default: token-id prompts")
    serve.add_argument("--vocab-size", type=int, default=32000,
                       help="prompt token ids are drawn below this (default 32000)")
    serve.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    serve.add_argument("--output-json", default=None)
    serve.set_defaults(handler=_serve)

    startup = kinds.add_parser("startup", help="process start to ready engine, cold and warm")
    startup.add_argument("--compile-cache-dir", default=None,
                         help="emptied first (default: a temporary directory)")
    startup.add_argument("--output-json", default=None)
    add_engine_flags(startup)
    startup.set_defaults(handler=lambda args: _startup(args, engine_kwargs(args)))


def _command() -> str:
    return shlex.join(["jaxpaged", *sys.argv[1:]])


def _throughput(args, kwargs) -> int:
    from jaxpaged.bench import throughput

    return throughput.main(args, kwargs, _command())


def _serve(args) -> int:
    from jaxpaged.bench import serve

    return serve.main(args, _command())


def _startup(args, kwargs) -> int:
    from jaxpaged.bench import startup

    return startup.main(args, kwargs, _command())
