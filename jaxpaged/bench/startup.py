"""`jaxpaged bench startup`: time from process start to a ready engine, cold and warm.

Runs a fresh Python process twice with the same engine flags and the same compilation-cache
directory (`JAXPAGED_COMPILE_CACHE`): first with the directory empty (cold: every program is
compiled), then again (warm: JAX's persistent compilation cache serves the programs it stored).
"Ready" is the moment `LLM(...)` has returned, i.e. weights are on the device and every bucket's
program is compiled. The child also reports its own breakdown: imports, engine construction,
warm-up, programs, JAX's compile events (`backend_compile_duration`, which fires for programs
served from the persistent cache too) and the persistent cache's hits and misses. The engine
stores every program, however quickly it compiles (`jax_persistent_cache_min_compile_time_secs`
0), so a warm start compiles nothing.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxpaged.bench.metrics import save_json

_READY = "JAXPAGED-STARTUP "


def child(engine_kwargs: dict) -> None:
    """Runs in the measured process: build the engine, print one line of facts."""
    begin = time.perf_counter()
    import jax

    from jaxpaged.llm import LLM

    imported = time.perf_counter()
    events = {"hits": 0, "misses": 0, "compiles": 0}

    def on_event(event: str, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            events["misses"] += 1

    def on_duration(event: str, duration: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events["compiles"] += 1

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    model = engine_kwargs.pop("model")
    if engine_kwargs.get("token_buckets"):
        engine_kwargs["token_buckets"] = tuple(engine_kwargs["token_buckets"])
    llm = LLM(model, **engine_kwargs)
    ready = time.perf_counter()
    facts = {"import_seconds": imported - begin, "engine_seconds": ready - imported,
             "warmup_seconds": llm.engine.warmup_seconds, "programs": llm.engine.num_compiles,
             "setup_seconds": llm.engine.setup_seconds,
             "lowering_seconds": llm.engine.runner.lowering_seconds,
             "program_compile_seconds": llm.engine.runner.compile_seconds,
             "backend_compiles": events["compiles"], "persistent_cache_hits": events["hits"],
             "persistent_cache_misses": events["misses"],
             "device": str(jax.devices()[0].device_kind)}
    print(_READY + json.dumps(facts), flush=True)


def measure(engine_kwargs: dict, cache_dir: str, timeout: float = 1800) -> dict:
    """One process start to ready, in seconds, plus the child's own facts."""
    env = {**os.environ, "JAXPAGED_COMPILE_CACHE": cache_dir}
    code = ("import json, sys; from jaxpaged.bench.startup import child; "
            "child(json.loads(sys.argv[1]))")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(engine_kwargs)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith(_READY):
                seconds = time.perf_counter() - start
                facts = json.loads(line[len(_READY):])
                break
        else:
            process.wait(timeout=60)
            raise RuntimeError(f"the engine did not start: {process.stderr.read()[-2000:]}")
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return {"seconds_to_ready": seconds, **facts}


def main(args, engine_kwargs: dict, command: str) -> int:
    cache_dir = args.compile_cache_dir or tempfile.mkdtemp(prefix="jaxpaged-startup-cache-")
    if args.compile_cache_dir and Path(cache_dir).exists():
        shutil.rmtree(cache_dir)  # cold means an empty cache
    try:
        cold = measure(dict(engine_kwargs), cache_dir)
        warm = measure(dict(engine_kwargs), cache_dir)
    finally:
        if not args.compile_cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    for name, run in (("cold", cold), ("warm", warm)):
        print(f"{name}: {run['seconds_to_ready']:6.1f} s to ready (imports {run['import_seconds']:.1f} s,"
              f" engine {run['engine_seconds']:.1f} s, warm-up {run['warmup_seconds']:.1f} s) | "
              f"{run['programs']} programs; {run['backend_compiles']} compile events, "
              f"{run['persistent_cache_hits']} served by the persistent cache, "
              f"{run['persistent_cache_misses']} stored to it")
    if args.output_json:
        save_json(args.output_json, {"command": command, "engine_args": engine_kwargs,
                                     "cold": cold, "warm": warm})
        print(f"saved {args.output_json}")
    return 0
