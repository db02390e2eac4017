"""The 8B decode forward with FP8 weights, by path: per-call dispatch and back-to-back step time.

    python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8,bf16 1,32
    FP8_MIN_ROWS=1 python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8 1,32,64,256        # W8A8 at every size
    FP8_MIN_ROWS=1000000 python3 benchmarks/fp8_decode_paths.py llama-3.1-8b fp8 64,256      # weight-only at every size

Arguments: a shipped config, quantizations (fp8 and/or bf16), decode batches (ctx 1024, bucket
max(batch, 16)). Prints one line per (quantization, batch); GPU only in practice (on CPU the 8B
does not fit and a 1B step takes seconds). Results: benchmarks/results/h200_session13.md.
"""
import re
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import os

import jax
import jax.numpy as jnp

from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size
from jaxpaged.model_source import resolve_model
from jaxpaged.models import quant
from jaxpaged.models.params import random_params
from jaxpaged.runner import ModelRunner

if os.environ.get("FP8_MIN_ROWS"): quant.FP8_ACTIVATION_MIN_ROWS = int(os.environ["FP8_MIN_ROWS"])
config = resolve_model(sys.argv[1], "dummy").model_config()
kinds = [None if k == "bf16" else k for k in sys.argv[2].split(",")]
batches = [int(b) for b in sys.argv[3].split(",")]
page = default_page_size()
for q in kinds:
    params = random_params(config, jnp.bfloat16, quantization=q)
    for batch in batches:
        bucket = max(batch, 16)
        inputs, pps = decode_batch_inputs(batch, 1024, config.vocab_size, page, bucket, bucket)
        runner = ModelRunner(config, params, num_pages=int(inputs.attention.page_indices.max()) + 1, page_size=page,
                             max_num_seqs=bucket, pages_per_seq=pps, max_model_len=1025, token_buckets=(bucket,),
                             attention_backend="auto", kv_dtype=jnp.bfloat16, quantization=q)
        t0 = time.perf_counter(); runner.warmup(); compile_s = time.perf_counter() - t0
        prog = runner._decode_programs.get(bucket, runner._forward_programs[bucket])
        text = prog.as_text()
        ncb = len(re.findall(r"command_buffer", text))
        def call():
            logits, _, runner.kv_pages = prog(runner.params, runner.kv_pages, inputs.token_ids, inputs.token_src, runner._last_token_ids, inputs.attention)
            return logits
        for _ in range(5): call().block_until_ready()
        t = time.perf_counter(); n = 30
        for _ in range(n): out = call()
        t1 = time.perf_counter(); out.block_until_ready(); t2 = time.perf_counter()
        print(f"{q} batch {batch}: dispatch {1e3*(t1-t)/n:.3f} ms/call, total {1e3*(t2-t)/n:.3f} ms/step, "
              f"compile {compile_s:.1f} s, min_rows {quant.FP8_ACTIVATION_MIN_ROWS}, xla_flags {os.environ.get('XLA_FLAGS', '')!r}, command_buffer mentions {ncb}, leaves {len(jax.tree.leaves(runner.params))}", flush=True)
        runner = None
    del params
