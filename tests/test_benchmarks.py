"""The benchmark scripts run end to end at tiny sizes (their numbers are not checked here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import offline_throughput  # noqa: E402
import prefix_cache  # noqa: E402


def test_offline_throughput_smoke(capsys):
    assert offline_throughput.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "c=  1" in out and "c=  4" in out and "speedup" in out and "decode" in out


def test_prefix_cache_smoke(capsys):
    assert prefix_cache.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "shared-prefix" in out and "no-sharing" in out and "hit rate" in out


def test_serve_sweep_smoke(capsys):
    import serve_sweep

    assert serve_sweep.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "c=  1" in out and "c=  2" in out and "TTFT p50" in out and "ITL p50" in out
