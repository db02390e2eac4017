"""jaxpaged: a JAX/XLA LLM inference engine with a paged KV cache and continuous batching."""

import os

__version__ = "0.1.0"

# XLA's GPU command buffers (CUDA graphs) must be updated whenever a program's buffers move, and an
# engine step's do every step (fresh step inputs, donated caches). On the H100 a Llama-8B decode
# step was 1.4-2 ms faster without them (benchmarks/results/dispatch_probe_h100.md), so they are
# off unless XLA_FLAGS already says otherwise. XLA reads the flag when the first backend starts.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()

from jaxpaged.request import CompletionOutput, RequestOutput  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # `LLM` pulls in JAX; import it lazily so host-only modules stay importable without it.
    if name == "LLM":
        from jaxpaged.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
