"""The benchmark code runs end to end at tiny sizes (CPU, SmolLM2 or a tiny dummy model); the
workloads and the statistics are checked against direct computations, the speeds are not."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpaged.bench.datasets import random_requests, sharegpt_like_requests, shared_prefix_requests
from jaxpaged.bench.metrics import RequestRecord, summarize
from jaxpaged.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


# ---- workloads and statistics (host only, milliseconds) ----------------------------------------

def test_random_workload_lengths_and_seed():
    requests = random_requests(200, 100, 20, 0.5, vocab_size=1000, seed=3)
    assert requests == random_requests(200, 100, 20, 0.5, vocab_size=1000, seed=3)
    assert requests != random_requests(200, 100, 20, 0.5, vocab_size=1000, seed=4)
    lens = [len(r.prompt_token_ids) for r in requests]
    outs = [r.output_len for r in requests]
    assert 50 <= min(lens) and max(lens) <= 150 and len(set(lens)) > 20
    assert 10 <= min(outs) and max(outs) <= 30
    ids = np.concatenate([r.prompt_token_ids for r in requests])
    assert ids.min() >= 100 and ids.max() < 1000
    fixed = random_requests(5, 64, 8, 0.0, vocab_size=1000, seed=0)
    assert {len(r.prompt_token_ids) for r in fixed} == {64} and {r.output_len for r in fixed} == {8}


def test_sharegpt_like_matches_its_documented_distribution():
    requests = sharegpt_like_requests(20000, vocab_size=500, seed=0, max_input_len=10**6,
                                      max_output_len=10**6)
    inputs = np.array([len(r.prompt_token_ids) for r in requests])
    outputs = np.array([r.output_len for r in requests])
    # log-normal means exp(mu + sigma^2 / 2): 147 e^0.405 ~ 220 and 146 e^0.32 ~ 201
    assert abs(inputs.mean() - 147 * math.exp(0.9 ** 2 / 2)) < 8
    assert abs(outputs.mean() - 146 * math.exp(0.8 ** 2 / 2)) < 6
    assert abs(np.median(inputs) - 147) < 5
    clipped = sharegpt_like_requests(500, vocab_size=500, seed=0, max_input_len=256, max_output_len=64)
    assert max(len(r.prompt_token_ids) for r in clipped) == 256
    assert max(r.output_len for r in clipped) == 64 and min(r.output_len for r in clipped) >= 4


def test_shared_prefix_groups_share_exactly_the_prefix():
    requests = shared_prefix_requests(3, 4, prefix_len=20, suffix_len=5, output_len=7,
                                      vocab_size=10**6, seed=0)
    assert len(requests) == 12 and {r.output_len for r in requests} == {7}
    prefixes = [tuple(r.prompt_token_ids[:20]) for r in requests]
    assert len(set(prefixes)) == 3 and prefixes[0] == prefixes[3] != prefixes[4]
    assert len({tuple(r.prompt_token_ids[20:]) for r in requests}) == 12  # unique suffixes


def test_summary_statistics():
    records = [RequestRecord(10, 3, ttft=0.1, latency=0.5, itls=[0.2, 0.2]),
               RequestRecord(20, 5, ttft=0.3, latency=0.7, itls=[0.1] * 4),
               RequestRecord(30, error="HTTP 500")]
    result = summarize(records, duration=2.0, peak_kv_usage=0.5)
    assert result["completed"] == 2 and result["failed"] == 1
    assert result["total_output_tokens"] == 8 and result["output_throughput"] == 4.0
    assert result["total_token_throughput"] == (30 + 8) / 2.0
    assert result["mean_ttft_ms"] == pytest.approx(200.0)
    assert result["mean_tpot_ms"] == pytest.approx(1e3 * (0.2 + 0.1) / 2)
    assert result["median_itl_ms"] == pytest.approx(100.0)
    assert result["p99_ttft_ms"] == pytest.approx(1e3 * (0.1 + 0.99 * 0.2))
    assert result["errors"] == ["HTTP 500"] and result["peak_kv_usage"] == 0.5


def test_host_side_bench_modules_import_without_jax():
    """The serving client must run on a machine with no JAX (e.g. next to another server)."""
    import subprocess

    from test_host_imports import SCRIPT

    modules = ["jaxpaged.bench.datasets", "jaxpaged.bench.metrics", "jaxpaged.bench.serve",
               "jaxpaged.bench.commands"]
    result = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"ok {name}" in result.stdout for name in modules)


# ---- the commands, end to end ------------------------------------------------------------------

SMALL_ENGINE = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                "--token-buckets", "16", "64"]


def test_bench_throughput_command(tmp_path, capsys, smollm2_path):
    out = tmp_path / "throughput.json"
    code = cli_main(["bench", "throughput", *SMALL_ENGINE, "--dtype", "float32", "--num-prompts", "6",
                     "--input-len", "20", "--output-len", "4", "--range-ratio", "0.5",
                     "--ignore-eos", "--output-json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "Output token throughput" in table and "Median TPOT" in table
    report = json.loads(out.read_text())
    expected = random_requests(6, 20, 4, 0.5, vocab_size=49152, seed=0)  # SmolLM2's vocabulary
    result = report["result"]
    assert result["completed"] == 6 and result["compiles_during_run"] == 0
    assert result["total_output_tokens"] == sum(r.output_len for r in expected)  # EOS ignored
    assert result["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in expected)
    assert 0 < result["peak_kv_usage"] <= 1 and report["engine"]["attention_backend"] == "reference"


def test_bench_startup_command(tmp_path, capsys):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    out = tmp_path / "startup.json"
    code = cli_main(["bench", "startup", "--model", str(model), "--load-format", "dummy",
                     *SMALL_ENGINE, "--compile-cache-dir", str(tmp_path / "xla"),
                     "--output-json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for run in ("cold", "warm"):
        assert report[run]["programs"] == 15  # 2 token buckets, 12 sampler variants, the scorer
        assert report[run]["seconds_to_ready"] > report[run]["engine_seconds"] > 0
    assert report["cold"]["backend_compiles"] >= 1
    # A warm start compiles nothing: every program, however small, comes from the cache.
    warm = report["warm"]
    assert warm["persistent_cache_misses"] == 0
    assert warm["persistent_cache_hits"] == warm["backend_compiles"] > 0
    assert "cold:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def server_url(smollm2_path):
    from jaxpaged.bench.serve import launch_server, stop_server

    process, url = launch_server(["--max-num-seqs", "4", "--max-model-len", "128",
                                  "--max-num-batched-tokens", "64"])
    yield url
    stop_server(process)


@pytest.mark.parametrize("mode", [["--max-concurrency", "2"], ["--request-rate", "20"]])
def test_bench_serve_command(server_url, tmp_path, capsys, mode):
    out = tmp_path / "serve.json"
    code = cli_main(["bench", "serve", "--base-url", server_url, "--num-prompts", "4",
                     "--input-len", "12", "--output-len", "3", "--ignore-eos", *mode,
                     "--output-json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["result"]
    assert result["completed"] == 4 and result["total_output_tokens"] == 12
    assert result["mean_ttft_ms"] > 0 and result["median_tpot_ms"] > 0
    assert 0 < result["peak_kv_usage"] <= 1  # polled from the server's /metrics
    assert "Inter-token latency" in capsys.readouterr().out


def test_serve_sweep_smoke(server_url, capsys):
    import serve_sweep

    assert serve_sweep.main(["--smoke", "--url", server_url]) == 0
    out = capsys.readouterr().out
    assert "c=  1" in out and "c=  2" in out and "TTFT p50" in out and "ITL p50" in out


def test_prefix_cache_smoke(capsys):
    import prefix_cache

    assert prefix_cache.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "shared-prefix" in out and "no-sharing" in out and "hit rate" in out


def test_offline_throughput_smoke(capsys):
    import offline_throughput

    assert offline_throughput.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "c=  1" in out and "c=  4" in out and "speedup" in out and "decode" in out


def test_bench_serve_time_limit_cancels_and_frees(server_url):
    """Requests unfinished at `max_seconds` are cancelled (the server aborts them) and counted."""
    import asyncio
    import time

    import httpx

    from jaxpaged.bench.serve import run_benchmark

    requests = random_requests(4, 12, 100, 0.0, vocab_size=49152, seed=5)  # max_model_len 128
    model = httpx.get(f"{server_url}/v1/models").json()["data"][0]["id"]
    result = asyncio.run(run_benchmark(server_url, model, requests, max_concurrency=2,
                                       ignore_eos=True, max_seconds=0.3))
    assert result["truncated"] and result["unfinished"] >= 2
    assert result["completed"] + result["failed"] == 4 and result["failed"] >= result["unfinished"]
    assert any("unfinished after" in e for e in result["errors"])
    deadline = time.monotonic() + 30  # the server notices the disconnects and frees the pages
    while True:
        metrics = httpx.get(f"{server_url}/metrics").text
        running = [line for line in metrics.splitlines()
                   if line.startswith("jaxpaged:num_requests_running")]
        if running and float(running[0].rsplit(" ", 1)[1]) == 0:
            break
        assert time.monotonic() < deadline, running
        time.sleep(0.2)


def test_h100_serve_smoke(tmp_path, capsys):
    import h100_serve

    assert h100_serve.verdict(9.0, 7.5) == "missed by 1.5 ms (1.20x the target)"
    assert h100_serve.verdict(50.0, 60.0).startswith("met")
    assert h100_serve.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "h100_serve.json").read_text())
    expected = sharegpt_like_requests(8, vocab_size=512, seed=0, max_input_len=48, max_output_len=12)
    streams = report["concurrency"]
    assert streams["completed"] == 8 and streams["failed"] == 0 and streams["max_concurrency"] == 4
    assert streams["total_output_tokens"] == sum(r.output_len for r in expected)  # EOS ignored
    assert streams["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in expected)
    # 2 token buckets + 4 sampler variants + the scorer at start-up; serving compiles nothing
    assert report["compiles_after_run"] == {"warmup_programs": 15, "compiles_after_warmup": 0}
    assert [row["request_rate"] for row in report["rate_sweep"]][-1] == "inf"
    assert all(row["failed"] == 0 for row in report["rate_sweep"])
    assert report["server_clean_exit"]
    warm = report["warm_start"]  # the second start, on the compilation cache the first filled
    assert warm["seconds_to_ready"] > 0 and warm["compiles_at_ready"]["compiles_after_warmup"] == 0
    markdown = (tmp_path / "h100_serve.md").read_text()
    assert "| median TPOT |" in markdown and "<= 7.5 ms" in markdown and "rate sweep" in markdown
    assert "rate inf" in capsys.readouterr().out


def test_h100_serve_passes_token_buckets_only_when_given(tmp_path):
    import h100_serve

    base = ["--out-dir", str(tmp_path), "--vocab-size", "1000"]
    assert "--token-buckets" not in h100_serve.serve_args(h100_serve.parse_args(base))
    args = h100_serve.serve_args(h100_serve.parse_args(base + ["--token-buckets", "8", "2048"]))
    assert args[args.index("--token-buckets"):][:3] == ["--token-buckets", "8", "2048"]


def test_h100_llama8b_smoke(tmp_path, capsys):
    """Issue 6's one-command H100 script, at tiny shapes on CPU: every part runs and reports."""
    import h100_llama8b

    argv = ["--smoke", "--skip-hf", "--step-breakdown", "--engine-decode-steps", "3",
            "--engine-profile-steps", "2", "--out-dir", str(tmp_path)]
    assert h100_llama8b.main(argv) == 0
    report = json.loads((tmp_path / "jax.json").read_text())
    args = h100_llama8b.parse_args(argv)
    assert [row["batch"] for row in report["decode"]] == sorted(args.batches)
    assert all(row["step_ms"] > 0 and row["floor_ms"] > 0 for row in report["decode"])
    # engine_decode raises if a timed step returned fewer rows than the batch
    assert [row["batch"] for row in report["engine_decode"]] == list(args.batches)
    for row in report["engine_decode"]:  # host split; a profile with no GPU kernels on CPU
        # the timed steps are centred on the decode rows' context, whose floor they are held to
        assert abs(row["context"] - args.context) <= 3 and row["prompt_len"] < args.context
        assert row["floor_ms"] > 0
        assert row["host_ms_per_step"]["dispatch_ms"] > 0
        assert row["host_ms_per_step"]["fetch_wait_ms"] >= 0
        assert row["device_profile"] == {"kernels": 0}
    mixed = report["mixed_step"]
    assert mixed["tokens"] == args.max_num_batched_tokens
    assert mixed["decode_seqs"] + sum(mixed["prefill_chunks"]) == mixed["tokens"]
    assert mixed["forward_ms"] > 0 and mixed["attention_ms"] > 0 and mixed["matmul_flop"] > 0
    offline = report["offline"]
    assert offline["completed"] == args.num_prompts and offline["failed"] == 0
    assert offline["total_output_tokens"] == args.num_prompts * args.output_len  # EOS ignored
    assert offline["compiles_during_run"] == 0
    markdown = (tmp_path / "h100_llama8b.md").read_text()
    for section in ("## Decode step at ctx", "Through the whole engine", "taken apart",
                    "## Offline throughput", "The workload's floor at this run's measured rates"):
        assert section in markdown
    floor = report["offline_floor"]  # its counts are checked in test_offline_floor_of_the_8b_workload
    assert floor["matmul_seconds"] > 0 and floor["kv_read_seconds"] > 0
    # the same flops at the held matmul rate instead of the burst's
    held, rates = report["offline_floor_sustained"], report["roofline"]
    assert held["kv_read_seconds"] == floor["kv_read_seconds"]
    assert math.isclose(held["matmul_seconds"] * rates["sustained_matmul_flop_s"],
                        floor["matmul_seconds"] * rates["matmul_flop_s"], rel_tol=1e-9)
    assert "offline_gpu_clocks" not in report  # no nvidia-smi on the CPU: nothing made up


def test_offline_floor_of_the_8b_workload():
    """Issue 6's offline workload on Llama-3.1-8B, counted by hand from the model card's shapes:
    per layer q/k/v/o 4096 x (4096 + 1024 + 1024 + 4096) and the MLP 3 x 4096 x 14336 weights,
    LM head 4096 x 128256; 1000 prompts x (1024 in, 128 out): 1151 tokens a sequence go through
    the layers, 128 are sampled."""
    from jaxpaged.bench.roofline import offline_floor
    from jaxpaged.model_source import resolve_model

    config = resolve_model("llama-3.1-8b", "dummy").model_config()
    floor = offline_floor(config, num_prompts=1000, input_len=1024, output_len=128,
                          matmul_flop_s=800e12, copy_bytes_s=3e12, kv_itemsize=2)
    per_layer = 4096 * 10240 + 3 * 4096 * 14336  # 218,103,808 weights
    assert floor["matmul_flops"] == 2 * 32 * per_layer * 1000 * 1151 + 2 * 4096 * 128256 * 128000
    # causal pairs: 1 + 2 + ... + 1151 per sequence; 32 heads x 128 dims, 32 layers
    assert floor["attention_flops"] == 4 * 4096 * 32 * 1000 * (1151 * 1152 // 2)
    # fed-back tokens at positions 1024..1150 read 1024..1150 cached keys: 8 kv heads x 128 dims,
    # K and V, bf16, 32 layers
    assert floor["kv_read_bytes"] == 1000 * sum(range(1024, 1151)) * 2 * 1024 * 2 * 32
    assert abs(floor["matmul_seconds"] - 20.7) < 0.1 and abs(floor["kv_read_seconds"] - 6.03) < 0.01
    assert floor["output_tok_s"] == 128000 / floor["seconds"]


def test_h100_llama8b_fp8_smoke(tmp_path):
    """The same script with FP8 linear weights: the decode steps and the engine run on quantized
    params and the report says what ran."""
    import h100_llama8b

    argv = ["--smoke", "--skip-hf", "--skip-offline", "--engine-decode-steps", "0", "--batches", "1",
            "--quantization", "fp8", "--out-dir", str(tmp_path)]
    assert h100_llama8b.main(argv) == 0
    report = json.loads((tmp_path / "jax.json").read_text())
    assert report["quantization"] == "fp8" and report["engine"]["quantization"] == "fp8"
    row = report["decode"][0]
    assert row["step_ms"] > 0 and row["floor_ms"] > 0
    assert (tmp_path / "h100_llama8b.md").read_text().startswith(
        "# Llama-3.1-8B-shaped, fp8 linear weights")


def test_fp8_matmul_smoke(tmp_path):
    import fp8_matmul

    out = tmp_path / "fp8.json"
    assert fp8_matmul.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["name"] for row in rows} == set(fp8_matmul.SHAPES)
    for row in rows:
        assert all(row[kind]["us"] > 0 and row[kind]["kernels"]
                   for kind in ("bf16", "fp8", "fp8_weight_only"))


def test_tp_decode_step_smoke(tmp_path):
    """Issue 5's TP=1 vs TP=2 decode benchmark at tiny shapes on 2 fake CPU devices (a fresh
    interpreter: the device count is fixed when JAX starts)."""
    import os
    import subprocess

    root = Path(__file__).parent.parent
    out = tmp_path / "tp.json"
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "tp_decode_step.py"),
                             "--smoke", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num_devices"] == 2
    assert [(row["tp"], row["batch"]) for row in report["rows"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all(row["step_ms"] > 0 and row["pipelined_ms"] > 0 for row in report["rows"])
    assert "pipelined_ms: TP=2" in result.stdout


def test_decode_profile_arithmetic_on_a_hand_made_trace(tmp_path):
    """Kernel events as the profiler writes them (perfetto JSON): stream rows count, the roll-up
    row and host rows do not; overlapping kernels count once as busy."""
    import gzip

    import decode_profile

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [("gemm_fusion_dot_1", 0, 100), ("ragged_paged_attention_gpu_decode", 50, 100),
               ("loop_add_fusion", 200, 20), ("nvjet_sm90_tss", 300, 100)]  # 2 steps' worth
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": t, "dur": d}
                     for n, t, d in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 9, "name": "dot.1", "ts": 0, "dur": 400},
               {"ph": "X", "pid": 2, "tid": 1, "name": "host", "ts": 0, "dur": 999}]
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    found, rows = decode_profile.gpu_kernel_events(tmp_path)
    assert sorted(e["name"] for e in found) == sorted(k[0] for k in kernels)
    assert rows == ["Stream #7", "XLA Ops"]
    summary = decode_profile.summarize(found, steps=2, weight_bytes=10**9)
    # span 0..400 us; busy: 0..150 (overlap once) + 20 + 100 = 270 us; per step / 1e3 -> ms
    assert summary["span_ms"] == pytest.approx(0.2) and summary["busy_ms"] == pytest.approx(0.135)
    assert summary["idle_ms"] == pytest.approx(0.065)
    assert summary["by_kind_ms"] == pytest.approx({"matmul": 0.1, "attention": 0.05, "other": 0.01})
    # 1 GB per step over 100 us of matmul per step
    assert summary["matmul_weight_bandwidth_tb_s"] == pytest.approx(10.0)
    assert summary["kernels_per_step"] == 2
    # idle gaps of 5 us or more: 150 -> 200 and 220 -> 300 (the overlap at 50 is none)
    assert summary["large_gaps_per_step"] == 1 and summary["large_gaps_ms_per_step"] == pytest.approx(0.065)
    assert summary["largest_gaps"][0] == {"us": 80, "after": "loop_add_fusion", "before": "nvjet_sm90_tss"}


def test_decode_profile_layer_kernels_are_one_layer_cycle():
    """Two steps of three layers (norm, gemm, attention): the middle step's kernels from after
    its second attention kernel to its third, with the gap before each."""
    import decode_profile

    events, t = [], 0
    for step in range(2):
        for layer in range(3):
            for name, dur in (("loop_norm_fusion", 2), ("gemm_fusion_dot", 10),
                              ("ragged_paged_attention_gpu_decode_only", 5)):
                events.append({"name": name, "ts": t, "dur": dur + step})  # step 1 runs longer
                t += dur + step + 1  # 1 us gap after each kernel
    rows = decode_profile.layer_kernels(events[::-1], steps=2)  # any order in the trace
    assert [(r["name"], r["us"], r["gap_before_us"]) for r in rows] == [
        ("loop_norm_fusion", 3, 1), ("gemm_fusion_dot", 11, 1),
        ("ragged_paged_attention_gpu_decode_only", 6, 1)]
    assert decode_profile.layer_kernels(events[:4], steps=2) == []  # too few attention kernels


def test_decode_profile_layer_cycle_of_a_mixed_step():
    """A mixed step launches three attention kernels a layer (KV write, prefill, decode): a
    layer's cycle runs from one KV write to the next, not between attention kernels."""
    import decode_profile

    layer = (("gemm_fusion_dot", 10), ("ragged_paged_attention_gpu_kv_write", 2),
             ("ragged_paged_attention_gpu_prefill", 7), ("ragged_paged_attention_gpu_decode", 5))
    events, t = [], 0
    for _ in range(3):
        for name, dur in layer:
            events.append({"name": name, "ts": t, "dur": dur})
            t += dur + 1
    rows = decode_profile.layer_kernels(events, steps=1)
    assert [r["name"] for r in rows] == [name for name, _ in layer[2:] + layer[:2]]


def test_mixed_batch_inputs_lay_out_decodes_then_prefill_chunks():
    """Two decoding sequences at context 5 and two prefill chunks (3 and 4 tokens), page 4."""
    import numpy as np

    from jaxpaged.bench.roofline import decode_batch_inputs

    inputs, pages_per_seq = decode_batch_inputs(2, 5, 100, 4, 16, prefill_chunks=(3, 4))
    meta = inputs.attention
    assert pages_per_seq == 2  # room for a 6th token
    assert int(meta.num_seqs[0]) == 4
    assert np.asarray(meta.cu_q_lens[:5]).tolist() == [0, 1, 2, 5, 9]
    assert np.asarray(meta.kv_lens[:4]).tolist() == [5, 5, 3, 4]  # the decoded token counts
    # pages one sequence after another: 2 + 2 for the decodes, 1 and 2 for the chunks
    assert np.asarray(meta.page_indices[:4, :2]).tolist()[:2] == [[0, 1], [2, 3]]
    assert int(meta.page_indices[2, 0]) == 4 and np.asarray(meta.page_indices[3, :2]).tolist() == [5, 6]


def test_decode_profile_smoke(tmp_path, capsys):
    """The script runs end to end on CPU (no GPU kernels there, which it says)."""
    import decode_profile

    from pallas_kernels.gpu import DECODE_DEFAULTS

    from jaxpaged import attention

    before = dict(DECODE_DEFAULTS)
    assert decode_profile.main(["--smoke", "--out-dir", str(tmp_path), "--max-num-seqs", "8",
                                "--decode-pages-per-iter", "2", "--xla-split-merge",
                                "--device-inputs"]) == 0
    assert DECODE_DEFAULTS == before and attention.FUSED_SPLIT_MERGE  # experiment settings do not leak
    report = json.loads((tmp_path / "decode_profile.json").read_text())
    assert [row["batch"] for row in report["batches"]] == [1, 4]
    assert all(row["max_num_seqs"] == 8 and row["device_inputs"] for row in report["batches"])
    assert "no GPU kernel events" in capsys.readouterr().out


def test_dispatch_probe_smoke(tmp_path):
    """The dispatch probe at tiny shapes on CPU: every variant times its steps."""
    import dispatch_probe

    assert dispatch_probe.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dispatch_probe.json").read_text())
    assert list(report["batches"]) == ["1", "4"]
    for row in report["batches"].values():
        assert row["sync_ms"] > 0 and row["dispatch_idle_ms"] > 0
        for variant in ("pipelined", "pipelined_device_inputs"):
            assert row[variant]["wall_ms_per_step"] > 0 and row[variant]["dispatch_ms_median"] > 0


def test_gemm_rates_layouts_compute_the_same_linear():
    """Every weight layout gemm_rates.py times is the same product as numpy's x @ w."""
    import gemm_rates

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32)
    for name, (fn, make) in gemm_rates.LAYOUTS.items():
        out = fn(x, np.asarray(make(w)))
        out = np.concatenate(out, axis=-1) if isinstance(out, tuple) else out
        np.testing.assert_allclose(np.asarray(out), x @ w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gemm_rates_smoke(tmp_path):
    import gemm_rates

    out = tmp_path / "gemm.json"
    assert gemm_rates.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {row["name"] for row in report["burst"]} == {"qkv", "o", "gate_up", "down"}
    assert all(row[layout]["us"] > 0 for row in report["burst"] for layout in ("in_out", "out_in"))
    assert all(row[name]["us"] > 0 for row in report["mlp"] for name in gemm_rates.MLP_OPTIONS)
    assert [run["windows"] for run in report["sustained"]] and all(
        run["best_tflop_s"] > 0 for run in report["sustained"])


def test_gpu_clocks_parse_and_summarize():
    """nvidia-smi lines as the sampler reads them, summarized by hand: two of three samples held
    by the power cap (bit 0x4, alone or with others), one not."""
    import gpu_clocks

    lines = ["1410, 1980, 697.50, 700.00, 70, 0x0000000000000004",
             "1980, 1980, 300.00, 700.00, 60, 0x0000000000000000",
             "1320, 1980, 700.50, 700.00, 74, 0x0000000000000084"]
    samples = [gpu_clocks.parse_line(line, t) for t, line in enumerate(lines)]
    assert samples[0] == {"t": 0, "sm_mhz": 1410.0, "max_sm_mhz": 1980.0, "power_w": 697.5,
                          "power_limit_w": 700.0, "temp_c": 70.0, "reasons": "0x0000000000000004"}
    assert gpu_clocks.parse_line("[N/A], 1980", 0) is None  # not the six fields asked for
    summary = gpu_clocks.summarize(samples)
    assert summary["samples"] == 3 and summary["sm_mhz"] == 1570.0 and summary["power_w"] == 566.0
    assert summary["power_capped_fraction"] == 2 / 3
    assert gpu_clocks.summarize([]) == {}
