"""The GPU's SM clock, power and clock-limit reasons, sampled by `nvidia-smi` while a benchmark
runs: an H100 at its 700 W cap runs long bf16 GEMM work well below its boost clock
(benchmarks/results/h100_session25.md), which a short burst of matmuls does not show.

No JAX here; where `nvidia-smi` is missing (the CPU) the sampler records nothing.
"""

import subprocess
import threading
import time

SMI_FIELDS = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # new name, old name
SW_POWER_CAP = 0x4  # the reasons bit nvidia-smi sets while the power cap holds the clock down


def parse_line(line: str, t: float) -> dict | None:
    """One `--format=csv,noheader,nounits` line of SMI_FIELDS + reasons, read at time `t`."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6:
        return None
    sm, max_sm, power, limit, temp = (_number(p) for p in parts[:5])
    return {"t": t, "sm_mhz": sm, "max_sm_mhz": max_sm, "power_w": power, "power_limit_w": limit,
            "temp_c": temp, "reasons": parts[5]}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


class SmiSampler:
    """`nvidia-smi` readings every `period_ms` in a background thread, as a context manager."""

    def __init__(self, period_ms: int = 200):
        self.samples, self.period_ms, self.process = [], period_ms, None

    def __enter__(self):
        fields = None
        for reasons in REASON_FIELDS:  # drivers name the reasons field differently
            try:
                probe = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS},{reasons}",
                                        "--format=csv,noheader"], capture_output=True, text=True)
            except FileNotFoundError:
                return self
            if probe.returncode == 0:
                fields = f"{SMI_FIELDS},{reasons}"
                break
        if fields is None:
            return self
        self.process = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.process.stdout:
            sample = parse_line(line, time.perf_counter())
            if sample:
                self.samples.append(sample)

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def between(self, start: float, end: float) -> list[dict]:
        return [s for s in self.samples if start <= s["t"] <= end]


def summarize(samples: list[dict]) -> dict:
    """Means of the samples' clock, power and temperature, and the share of samples taken while
    the power cap held the clock down ({} for no samples)."""
    if not samples:
        return {}

    def mean(key):
        values = [s[key] for s in samples if s[key] is not None]
        return sum(values) / len(values) if values else None

    def capped(sample):
        try:
            return bool(int(sample["reasons"], 16) & SW_POWER_CAP)
        except ValueError:
            return False

    return {"samples": len(samples), "sm_mhz": mean("sm_mhz"), "max_sm_mhz": samples[0]["max_sm_mhz"],
            "power_w": mean("power_w"), "power_limit_w": samples[0]["power_limit_w"],
            "temp_c": mean("temp_c"), "power_capped_fraction": sum(map(capped, samples)) / len(samples)}
