"""CPU pre-flight for the device run: lowers the op with decode_impl="triton" for CUDA through
jax_triton 0.3.1's own lowering, with its GPU runtime calls (kernel objects, launch records,
serialisation) stubbed, since jax_triton cannot be imported without a CUDA jaxlib. What it checks
without a GPU: every Triton kernel compiles to a cubin for sm_90 through jax_triton's compile path
(shared memory per program printed), and the argument count, dtypes, constexprs, grid, zeroed
outputs and input/output aliases agree between triton_decode.py and jax_triton. What it cannot:
that the kernels run, or run correctly (tests/test_triton_kernel.py -m gpu on the device).

    pip install --no-deps jax_triton-0.3.1-py3-none-any.whl   # and triton==3.6.0
    python benchmarks/triton_lowering_check.py
"""

import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.lib import gpu_triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

records = []


class _Record:
    def __init__(self, *args):
        self.args = args
        records.append((type(self).__name__, args))

    def to_proto(self, *_):
        return b"stub"


_STUB = dict(
    TritonKernel=type("TritonKernel", (_Record,), {}),
    TritonKernelCall=type("TritonKernelCall", (_Record,), {}),
    TritonAutotunedKernelCall=type("TritonAutotunedKernelCall", (_Record,), {}),
    create_array_parameter=lambda zeroed_bytes, divisibility: ("array", zeroed_bytes),
    create_scalar_parameter=lambda value, dtype: ("scalar", value),
    get_compute_capability=lambda device: 90,
    get_serialized_metadata=lambda *_: b"",
)


def main():
    if jax.devices()[0].platform == "gpu":
        sys.exit("this check stubs jax_triton's GPU runtime: run it on a CPU machine")
    for name, value in _STUB.items():
        setattr(gpu_triton, name, value)
    import jax_triton

    jax_triton.triton_lib.triton_kernel_call_lib = types.SimpleNamespace(**_STUB)
    from pallas_kernels.gpu import ragged_paged_attention_gpu
    from test_gpu_kernel import make_batch

    seqs = [(1, 33), (0, 40), (65, 65), (1, 900), (17, 129)]
    cases = [  # dtype, (q heads, kv heads), head_dim, page_size, decode options, static options
        (jnp.bfloat16, (32, 8), 128, 64, {}, {}),
        (jnp.bfloat16, (32, 8), 128, 16, dict(num_splits=5, merge="kernel"), dict(sliding_window=100)),
        (jnp.float32, (9, 3), 64, 128, dict(num_splits=1), dict(soft_cap=30.0)),
        (jnp.bfloat16, (32, 8), 256, 32, dict(num_splits=32, block_n=64), {}),
        (jnp.float32, (8, 2), 128, 64, dict(num_splits=16), {}),
        (jnp.bfloat16, (32, 8), 128, 64, dict(num_stages=1, num_warps=8), {}),
    ]
    for dtype, (hq, hkv), d, page, dec, static in cases:
        args = make_batch(seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=dtype,
                          pad_tokens=5, pad_seqs=1)
        records.clear()
        op = lambda *a: ragged_paged_attention_gpu(*a, sm_scale=d**-0.5, q_block_size=16, kv_block_size=32,
                                                   decode_impl="triton", decode=dec, **static)
        text = jax.jit(op).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        kernels = [(a[0], f"{a[3]} B shared") for kind, a in records if kind == "TritonKernel"]
        launches = [dict(grid=a[1:4], params=len(a[4]), zeroed=[p[1] for p in a[4] if p[0] == "array" and p[1]])
                    for kind, a in records if kind == "TritonKernelCall"]
        print(f"{jnp.dtype(dtype).name} {hq}/{hkv} heads d{d} page {page} {dec} {static}: {kernels} {launches} "
              f"custom calls {text.count('triton_kernel_call')}", flush=True)


if __name__ == "__main__":
    main()
