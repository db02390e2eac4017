"""jaxpaged: a JAX/XLA LLM inference engine with a paged KV cache and continuous batching."""

import os

__version__ = "0.1.0"

# XLA's GPU command buffers (CUDA graphs) for fusions, cuBLAS(Lt) GEMMs and custom calls (the
# Pallas/Triton kernels), set explicitly as measured, unless XLA_FLAGS already names the flag.
# With async scheduling the host launches step N+1 while step N runs; launching a Llama-8B step
# kernel by kernel took the host ~6 ms, longer than a batch-1 step, and as graphs ~3 ms. On the
# H100 serving TPOT at 4 streams went from 9.0 to 7.0 ms (two leases;
# benchmarks/results/h100_serve.md). A synchronous step is slower with them (8.2 -> 9.4 ms at
# batch 1: graphs are updated every step, as step inputs move), so with async scheduling off turn
# them off (`--xla_gpu_enable_command_buffer=`). XLA reads the flag when the first backend starts.
COMMAND_BUFFER_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_gpu_enable_command_buffer={COMMAND_BUFFER_TYPES}").strip()

from jaxpaged.request import CompletionOutput, RequestOutput  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # `LLM` pulls in JAX; import it lazily so host-only modules stay importable without it.
    if name == "LLM":
        from jaxpaged.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
