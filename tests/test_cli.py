"""The README's first command: `jaxpaged generate` with the default model, as a user runs it."""

import subprocess
import sys


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxpaged.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_answers_with_default_model(smollm2_path):
    result = run_cli("generate", "What is the capital of France?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def test_bad_flag_is_one_line_error():
    result = run_cli("generate", "hi", "--max-num-seqs", "0", timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("jaxpaged: error")]
    assert lines == ["jaxpaged: error: max_num_seqs must be a positive integer, got 0"]
    assert "Traceback" not in result.stderr
