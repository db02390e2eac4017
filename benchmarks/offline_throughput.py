"""Offline throughput: jaxpaged vs transformers `generate` on the same prompts, side by side.

For each concurrency level c, both engines process the same prompts: mixed prompt lengths and
mixed `max_tokens`, with EOS ignored so every request produces exactly its `max_tokens`.
- jaxpaged: `LLM(max_num_seqs=c).generate(all prompts)` (continuous batching, c in flight).
- transformers: what a user would write: batches of c prompts, left-padded to the longest, each
  batch generating until its longest request is done; only the requested tokens count as output.
Output tokens/s = requested output tokens / wall time (model loading and compilation excluded,
reported separately). Also reports single-request decode latency (ms per output token).

    python3 benchmarks/offline_throughput.py                  # full run, CPU, SmolLM2 float32
    python3 benchmarks/offline_throughput.py --smoke          # seconds; exercises the code in CI
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_workload(num_prompts: int, seed: int, min_prompt: int, max_prompt: int,
                  min_output: int, max_output: int, vocab: int):
    """Prompt lengths log-uniform in [min_prompt, max_prompt] (many short, some long, like chat
    traffic); output lengths uniform in [min_output, max_output]; token ids uniform over the
    vocabulary minus the first 100 (special tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(min_prompt), np.log(max_prompt), num_prompts)).astype(int)
    prompts = [rng.integers(100, vocab, n).tolist() for n in lengths]
    max_tokens = rng.integers(min_output, max_output + 1, num_prompts).tolist()
    return prompts, max_tokens


def run_jaxpaged(prompts, max_tokens, concurrency: int, args) -> dict:
    from jaxpaged import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model, dtype="float32", max_num_seqs=concurrency,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens)
    setup = time.perf_counter() - start
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(max_tokens), (produced, sum(max_tokens))
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed,
            "setup_seconds": setup, "compiled_programs": llm.engine.num_compiles,
            "preemptions": llm.engine.scheduler.num_preemptions, "llm": llm}


def single_request_latency(llm, prompt, num_tokens: int) -> dict:
    """Steps the engine by hand: time to first token, then ms per decode step."""
    from jaxpaged import SamplingParams

    engine = llm.engine
    engine.add_request("latency", prompt, SamplingParams(temperature=0, max_tokens=num_tokens,
                                                         ignore_eos=True))
    start = time.perf_counter()
    first, stamps = None, []
    while engine.has_unfinished:
        if engine.step() and first is None:
            first = time.perf_counter()
        stamps.append(time.perf_counter())
    decode = (stamps[-1] - first) / (num_tokens - 1)
    return {"ttft_ms": 1e3 * (first - start), "decode_ms_per_token": 1e3 * decode,
            "prompt_tokens": len(prompt), "output_tokens": num_tokens}


def run_transformers(prompts, max_tokens, concurrency: int, model, pad_id: int) -> dict:
    import torch

    start = time.perf_counter()
    produced = 0
    for i in range(0, len(prompts), concurrency):
        batch, wants = prompts[i:i + concurrency], max_tokens[i:i + concurrency]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(wants),
                                 min_new_tokens=max(wants), do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] - width == max(wants)
        produced += sum(wants)  # a user keeps each request's first max_tokens tokens
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed}


def transformers_latency(model, prompt, num_tokens: int) -> dict:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                       min_new_tokens=num_tokens, do_sample=False)
        total = time.perf_counter() - start
    return {"ttft_ms": 1e3 * ttft, "decode_ms_per_token": 1e3 * (total - ttft) / (num_tokens - 1)}


def load_transformers(model_name):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpaged.model_source import resolve_model

    source = resolve_model(model_name)
    kwargs = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    root = source.path.parent if source.kind == "gguf" else source.path
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kwargs).eval()
    return model, source.tokenizer()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts-per-slot", type=int, default=2,
                        help="prompts per concurrency level = max(4, this x concurrency)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 512])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to exercise the code")
    parser.add_argument("--out", default=str(RESULTS / "offline_throughput_cpu.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.prompts_per_slot = [1, 4], 1
        args.prompt_len, args.output_len, args.max_model_len = [8, 40], [2, 6], 128
        args.max_num_batched_tokens = 64

    hf_model, tokenizer = (None, None) if args.skip_transformers else load_transformers(args.model)
    vocab = len(tokenizer) if tokenizer is not None else 32000
    rows = []
    for level in args.concurrency:
        num_prompts = max(4, args.prompts_per_slot * level)
        prompts, max_tokens = make_workload(num_prompts, args.seed + level, *args.prompt_len,
                                            *args.output_len, vocab)
        ours = run_jaxpaged(prompts, max_tokens, level, args)
        row = {"concurrency": level, "num_prompts": num_prompts,
               "jaxpaged": {k: v for k, v in ours.items() if k != "llm"}}
        if level == 1:
            latency_prompt, latency_tokens = prompts[0][:128], (8 if args.smoke else 64)
            row["jaxpaged_latency"] = single_request_latency(ours["llm"], latency_prompt, latency_tokens)
        del ours
        if hf_model is not None:
            row["transformers"] = run_transformers(prompts, max_tokens, level, hf_model,
                                                   tokenizer.pad_token_id or 0)
            row["speedup"] = row["jaxpaged"]["output_tok_s"] / row["transformers"]["output_tok_s"]
            if level == 1:
                row["transformers_latency"] = transformers_latency(hf_model, latency_prompt,
                                                                   latency_tokens)
        rows.append(row)
        print(format_row(row), flush=True)

    import jax

    report = {"command": " ".join(["python3", "benchmarks/offline_throughput.py", *(argv or sys.argv[1:])]),
              "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}",
              "jax": jax.__version__, "device": str(jax.devices()[0]), "args": vars(args), "rows": rows}
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"saved {args.out}")
    return 0


def format_row(row: dict) -> str:
    ours = row["jaxpaged"]
    text = (f"c={row['concurrency']:>3} prompts={row['num_prompts']:>3} | jaxpaged "
            f"{ours['output_tok_s']:7.1f} tok/s ({ours['seconds']:.1f} s, setup {ours['setup_seconds']:.1f} s, "
            f"{ours['compiled_programs']} programs)")
    if "transformers" in row:
        theirs = row["transformers"]
        text += (f" | transformers {theirs['output_tok_s']:7.1f} tok/s ({theirs['seconds']:.1f} s)"
                 f" | speedup {row['speedup']:.2f}x")
    for key in ("jaxpaged_latency", "transformers_latency"):
        if key in row:
            lat = row[key]
            text += f"\n      {key}: TTFT {lat['ttft_ms']:.0f} ms, decode {lat['decode_ms_per_token']:.1f} ms/token"
    return text


if __name__ == "__main__":
    sys.exit(main())
