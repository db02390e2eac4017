"""jaxpaged: a JAX/XLA LLM inference engine with a paged KV cache and continuous batching."""

__version__ = "0.1.0"

from jaxpaged.request import CompletionOutput, RequestOutput  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # `LLM` pulls in JAX; import it lazily so host-only modules stay importable without it.
    if name == "LLM":
        from jaxpaged.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
