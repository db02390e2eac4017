"""`jaxpaged` command line: generate, chat, serve, run-batch, convert, bench.

Engine flags are generated from EngineConfig's fields and named like vLLM's (`--max-model-len`).
Errors reach the user as one line, never a traceback.
"""

import argparse
import dataclasses
import logging
import os
import sys
import typing

from jaxpaged.config import EngineConfig

_FLAG_HELP = {
    "model": "HF directory, .gguf file or Hub name (default: the embedded SmolLM2-135M-Instruct)",
    "dtype": "auto (float32 on CPU, bfloat16 on accelerators), float32, bfloat16, float16",
    "attention_backend": "auto, reference or pallas",
    "async_scheduling": "schedule step N+1 while step N runs on the device "
                        "(default: on for GPU and TPU, off on CPU)",
    "tensor_parallel_size": "shard the model and KV cache over this many devices (default: 1)",
    "page_size": "tokens per KV-cache page, a power of two (default: 64 on NVIDIA GPUs, 16 elsewhere)",
    "load_format": "auto (read the checkpoint) or dummy (random weights of the model's shapes; "
                   "also for shipped configs: llama-3.1-8b, llama-3.2-1b, qwen2.5-7b)",
    "kv_cache_dtype": "auto (the model dtype), fp8 (= fp8_e4m3) or fp8_e5m2: store the KV cache in "
                      "one byte per value (twice the pages, half the bytes a decode step reads)",
    "quantization": "fp8: quantize the linear weights to FP8 (e4m3, per output channel) as they "
                    "load, activations per token (default: none)",
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field: --max-num-seqs, --page-size, ..."""
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = next((t for t in (int, float) if t in (field.type, *typing.get_args(field.type))), str)
        if bool in (field.type, *typing.get_args(field.type)):  # --x / --no-x
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=_FLAG_HELP.get(field.name))
            continue
        if field.name == "token_buckets":
            parser.add_argument(flag, type=int, nargs="+", default=None, help="compiled token buckets")
            continue
        parser.add_argument(flag, type=kind, default=field.default,
                            help=_FLAG_HELP.get(field.name, f"(default: {field.default})"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if values["token_buckets"] is not None:
        values["token_buckets"] = tuple(values["token_buckets"])
    return values


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


def _sampling_params(args):
    from jaxpaged.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k)


def _make_llm(args):
    from jaxpaged.llm import LLM

    kwargs = engine_kwargs(args)
    return LLM(kwargs.pop("model"), **kwargs)


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    if args.raw:
        output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    else:
        output = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _make_llm(args)
    conversation = []
    if args.system:
        conversation.append({"role": "system", "content": args.system})
    print("Chatting with the model; an empty line or Ctrl-D ends the session.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        conversation.append({"role": "user", "content": line})
        reply = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0].text
        print(f"model> {reply}", flush=True)
        conversation.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    from jaxpaged.server.serve import serve

    kwargs = engine_kwargs(args)
    if args.model_arg is not None:
        if kwargs["model"] is not None and kwargs["model"] != args.model_arg:
            raise ValueError("give the model once: as the argument or as --model")
        kwargs["model"] = args.model_arg
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError("--max-waiting-requests must be a positive integer")
    serve(kwargs, host=args.host, port=args.port, api_key=args.api_key,
          served_model_names=args.served_model_name,
          max_waiting_requests=args.max_waiting_requests, log_level=args.uvicorn_log_level)
    return 0


def cmd_run_batch(args) -> int:
    from pathlib import Path

    from jaxpaged.batch import BatchRunner

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"no input file {args.input}")
    llm = _make_llm(args)
    runner = BatchRunner(llm.engine, served_model_names=args.served_model_name)
    summary = runner.run(Path(args.input), Path(args.output), use_tqdm=not args.no_progress)
    print(f"run-batch: {summary.completed} completed, {summary.failed} failed, "
          f"{summary.skipped} skipped (already in {args.output} or repeated)", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from conversions.convert import convert

    dst = convert(args.src, args.dst, dtype=args.dtype, model_type=args.model_type,
                  force=args.force)
    print(f"wrote {dst}; serve it with: jaxpaged serve {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt and print the text")
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true",
                          help="send the prompt as plain text instead of a chat message")
    _sampling_flags(generate)
    add_engine_flags(generate)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(chat)
    add_engine_flags(chat)
    chat.set_defaults(handler=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                       help="same as --model (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"),
                       help="clients must send 'Authorization: Bearer KEY' (default: "
                            "$JAXPAGED_API_KEY; unset: no key)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) clients use (default: the model's name)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 503 + Retry-After beyond this many waiting requests")
    serve.add_argument("--uvicorn-log-level", default="info")
    add_engine_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    batch = commands.add_parser(
        "run-batch", help="OpenAI Batch-format JSONL through the engine; resumable",
        description="Reads requests (custom_id, method, url, body) from INPUT line by line and "
                    "appends one result line per request to OUTPUT as each finishes. Rerun the "
                    "same command after an interruption: custom_ids already in OUTPUT are skipped.")
    batch.add_argument("-i", "--input", required=True, help="input JSONL file")
    batch.add_argument("-o", "--output", required=True, help="output JSONL file (appended to)")
    batch.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) the requests' 'model' field may use "
                            "(default: the model's name)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_flags(batch)
    batch.set_defaults(handler=cmd_run_batch)

    convert = commands.add_parser("convert", help="convert an HF dir, Hub name or GGUF file into "
                                                  "a jaxpaged (orbax) checkpoint")
    convert.add_argument("src", help="HF directory, Hub name or .gguf file")
    convert.add_argument("dst", help="output directory (use it as --model)")
    convert.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                         help="auto keeps bf16/fp16 sources as bf16, the rest (GGUF too) as fp32")
    convert.add_argument("--model-type", default=None,
                         help="override the config's model_type (llama, mistral, qwen2, qwen3)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing DST")
    convert.set_defaults(handler=cmd_convert)

    from jaxpaged.bench.commands import add_bench_parser

    add_bench_parser(commands, add_engine_flags, engine_kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("JAXPAGED_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"jaxpaged: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
