#!/usr/bin/env bash
# Device check of the Triton decode path (issue 3): its GPU tests, then the Pallas and Triton
# decode kernels timed on the same shapes in one bench run. Results go to $OUT.
#
# Run from the repository root on the device, with jax_triton importable, e.g. through the device
# tool from /work/main (copy of this branch in devrun/triton, carry ["devrun/triton", ".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/devrun/triton; \
#   cd devrun/triton && export PYTHONUNBUFFERED=1; bash benchmarks/gpu_check_triton.sh
# Expected ~5 min; each stage has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds), so
# the whole stays under the device tool's 600 s.
set -u
out=${OUT:-/tmp/gpu_check_triton}
mkdir -p "$out"

python3 -c "import jax, triton, jax_triton; print('jax', jax.__version__, 'triton', triton.__version__,
'jax_triton', jax_triton.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"

JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-150}" \
    python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 tests/test_triton_kernel.py 2>&1 \
    | tee "$out/triton_gpu_tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/triton_gpu_tests.log"

timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/gpu_kernel_bench.py --decode-only --no-ref --rounds 3 \
    --decode-impl pallas triton --kernel-only --sweep-triton \
    --out "$out/gpu_kernel_bench_triton_h100.json" --md "$out/gpu_kernel_bench_triton_h100.md" 2>&1 \
    | tee "$out/gpu_kernel_bench_triton.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_kernel_bench_triton.log"
