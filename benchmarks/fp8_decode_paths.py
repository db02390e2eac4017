"""The 8B decode forward with FP8 weights, by path: per-call dispatch and back-to-back step time.

    python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8,bf16 1,32
    FP8_MIN_ROWS=1 python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8 1,32,64,256        # W8A8 at every size
    FP8_MIN_ROWS=1000000 python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8 64,256      # weight-only at every size

Arguments: a shipped config, quantizations (fp8 and/or bf16), decode batches (ctx 1024, bucket
max(batch, 16)). Prints one line per (quantization, batch); GPU only in practice (on CPU the 8B
does not fit and a 1B step takes seconds). Results: benchmarks/results/h200_session13.md.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONTEXT, WARMUP_CALLS, TIMED_CALLS = 1024, 5, 30


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    model, kinds, batches = argv[0], argv[1].split(","), [int(b) for b in argv[2].split(",")]

    import jax.numpy as jnp

    from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size
    from jaxpaged.model_source import resolve_model
    from jaxpaged.models import quant
    from jaxpaged.models.params import random_params
    from jaxpaged.runner import ModelRunner

    if os.environ.get("FP8_MIN_ROWS"):  # send every bucket down one path of quant.linear
        quant.FP8_ACTIVATION_MIN_ROWS = int(os.environ["FP8_MIN_ROWS"])
    config = resolve_model(model, "dummy").model_config()
    page_size = default_page_size()
    for kind in kinds:
        quantization = None if kind == "bf16" else kind
        params = random_params(config, jnp.bfloat16, quantization=quantization)
        for batch in batches:
            bucket = max(batch, 16)
            inputs, pages_per_seq = decode_batch_inputs(batch, CONTEXT, config.vocab_size, page_size,
                                                        bucket, bucket)
            runner = ModelRunner(config, params, num_pages=int(inputs.attention.page_indices.max()) + 1,
                                 page_size=page_size, max_num_seqs=bucket, pages_per_seq=pages_per_seq,
                                 max_model_len=CONTEXT + 1, token_buckets=(bucket,),
                                 attention_backend="auto", kv_dtype=jnp.bfloat16,
                                 quantization=quantization)
            begin = time.perf_counter()
            runner.warmup()
            compile_seconds = time.perf_counter() - begin
            program = runner._decode_programs.get(bucket, runner._forward_programs[bucket])

            buffer = runner.device_inputs(inputs)[0]

            def call(runner=runner, program=program, buffer=buffer):
                logits, _, runner.kv_pages = program(runner.params, runner.kv_pages, buffer,
                                                     runner._last_token_ids)
                return logits

            for _ in range(WARMUP_CALLS):
                call().block_until_ready()
            start = time.perf_counter()
            for _ in range(TIMED_CALLS):
                logits = call()
            dispatched = time.perf_counter()
            logits.block_until_ready()
            done = time.perf_counter()
            print(f"{kind} batch {batch}: dispatch {1e3 * (dispatched - start) / TIMED_CALLS:.3f} ms/call, "
                  f"total {1e3 * (done - start) / TIMED_CALLS:.3f} ms/step, compile {compile_seconds:.1f} s, "
                  f"min_rows {quant.FP8_ACTIVATION_MIN_ROWS}, xla_flags {os.environ.get('XLA_FLAGS', '')!r}",
                  flush=True)
            runner = None
        del params
    return 0


if __name__ == "__main__":
    sys.exit(main())
