"""Does dispatching a step block the host? (async scheduling only pays if it does not)

Builds the runner for a model's shapes with random weights, one decode batch at ctx --context, and
times, per batch size:
- `sync`: dispatch + fetch of one step, the queue empty before each;
- `dispatch (idle)`: the host time of `runner.dispatch` alone, the queue empty;
- `pipelined`: --steps dispatches back to back (each step's token taken on device from the
  previous one, as async scheduling does), then one fetch: host time per dispatch, and wall time
  per step; if dispatch returned at once, the host part is far below the step time;
- the same pipelined run with the step's packed input buffers already on the device, which
  separates the host-to-device copies from the launch itself.

    python3 benchmarks/dispatch_probe.py --out-dir $OUT             # on the GPU
    python3 benchmarks/dispatch_probe.py --smoke --out-dir /tmp/p   # CPU, tiny shapes
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def probe(runner, inputs, steps: int) -> dict:
    import jax
    import numpy as np

    def dispatch(x):
        return runner.dispatch(x, apply_penalties=False, draw="greedy")

    runner.fetch(dispatch(inputs))  # first execution, not timed
    sync, idle = [], []
    for _ in range(steps):
        begin = time.perf_counter()
        out = dispatch(inputs)
        middle = time.perf_counter()
        runner.fetch(out)
        sync.append(time.perf_counter() - begin)
        idle.append(middle - begin)
    # Every decode token comes from the previous step's output, as under async scheduling.
    chained = inputs._replace(token_src=np.where(np.arange(len(inputs.token_src)) < 1, 0, -1)
                              .astype(np.int32))
    result = {"sync_ms": 1e3 * float(np.median(sync)),
              "dispatch_idle_ms": 1e3 * float(np.median(idle))}
    buffers = runner.device_inputs(chained)
    for name in ("pipelined", "pipelined_device_inputs"):
        if name == "pipelined_device_inputs":  # the packed buffers copied once, reused
            runner.device_inputs = lambda _: buffers
        begin = time.perf_counter()
        host = []
        for _ in range(steps):
            t = time.perf_counter()
            out = dispatch(chained)
            host.append(time.perf_counter() - t)
        runner.fetch(out)
        wall = time.perf_counter() - begin
        result[name] = {"dispatch_ms_median": 1e3 * float(np.median(host)),
                        "dispatch_ms_max": 1e3 * float(np.max(host)),
                        "wall_ms_per_step": 1e3 * wall / steps}
    del runner.device_inputs  # the class's method again
    return result


def jax_only(steps: int) -> dict:
    """The same question for plain jitted matmuls over a big buffer: donated or not, jit or AOT."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.zeros((256 << 20,), jnp.float32)
    w = jnp.ones((4096, 4096), jnp.bfloat16)

    def body(x, w):
        y = w
        for _ in range(8):
            y = (y @ w) * 0.001
        return x.at[0].add(y[0, 0].astype(jnp.float32)), y

    donated = jax.jit(body, donate_argnums=0)
    variants = {"jit": jax.jit(body), "jit_donated": donated,
                "aot_donated": donated.lower(x, w).compile()}
    result = {}
    for name, fn in variants.items():
        x, y = fn(x, w)
        jax.block_until_ready(y)
        host = []
        begin = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            x, y = fn(x, w)
            host.append(time.perf_counter() - t)
        jax.block_until_ready(y)
        result[name] = {"dispatch_ms_median": 1e3 * float(np.median(host)),
                        "wall_ms_per_step": 1e3 * (time.perf_counter() - begin) / steps}
        print(f"jax-only {name}: {result[name]}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--jax-only", action="store_true", help="only the plain-JAX variants")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.jax_only:
        (out / "dispatch_probe_jax_only.json").write_text(json.dumps(jax_only(args.steps), indent=2))
        return 0

    import jax
    import jax.numpy as jnp

    from jaxpaged.bench.roofline import decode_batch_inputs, default_page_size
    from jaxpaged.config import ModelConfig
    from jaxpaged.model_source import resolve_model
    from jaxpaged.models.params import random_params
    from jaxpaged.runner import ModelRunner

    if args.smoke:
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512}
        args.batches, args.context, args.steps = [1, 4], 64, 5
        config, dtype = ModelConfig.from_hf_config(hf), jnp.float32
    else:
        config = resolve_model(args.model, "dummy").model_config()
        dtype = jnp.bfloat16
    params = random_params(config, dtype)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": args.model,
              "attention_backend": args.attention_backend,
              "context": args.context, "steps": args.steps, "batches": {}}
    page_size = default_page_size()
    pages_per_seq = -(-(args.context + 1) // page_size)
    for batch in args.batches:
        bucket = max(batch, 16)
        runner = ModelRunner(config, params, num_pages=batch * pages_per_seq, page_size=page_size,
                             max_num_seqs=batch, pages_per_seq=pages_per_seq,
                             max_model_len=args.context + 1, token_buckets=(bucket,),
                             attention_backend=args.attention_backend, kv_dtype=dtype)
        runner.warmup()
        inputs, _ = decode_batch_inputs(batch, args.context, config.vocab_size, page_size, bucket)
        row = report["batches"][batch] = probe(runner, inputs, args.steps)
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
        del runner
    (out / "dispatch_probe.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
