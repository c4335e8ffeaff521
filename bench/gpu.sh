#!/usr/bin/env bash
# The lent GPU machine's job, inside its 10-minute command limit: the CUDA tests on compiled kernels, then
# the benchmarks. Run from anywhere: bash bench/gpu.sh [python -m bench options...]
#
# 1. Installs the wheels carried in .whl/ (the machine has no network), e.g. matplotlib for the chart:
#      pip download matplotlib -d .whl   (here, before the run; .whl/ must then be carried)
# 2. Tests marked `cuda` (GPU_TEST_MARKS overrides the marker expression). TRITON_INTERPRET=0, not unset:
#    tests/conftest.py defaults an unset TRITON_INTERPRET to 1, and the interpreter flag holds for the whole
#    process (triton.jit decides at import), so CUDA tensors would run interpreted and no kernel would be
#    compiled. The CPU tests that force the Triton backend need the interpreter: they are CI's job.
# 3. python -m bench at the suites' COCO shapes; results go to $OUT when set (the device tool brings that
#    folder back), else bench/results/.
# Exit status: non-zero if the tests or the runner failed; the runner runs even after failed tests.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install --quiet --no-index --find-links .whl .whl/*.whl || echo "gpu.sh: installing .whl/ failed" >&2
fi

export TRITON_INTERPRET=0
python - <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", flush=True)
EOF

status=0
timeout 270 python -m pytest -m "${GPU_TEST_MARKS:-cuda}" -x -q -p no:cacheprovider || status=$?
echo "gpu.sh: tests exit ${status}"

out_dir="${OUT:-bench/results}"
timeout 280 python -m bench --out-dir "$out_dir" --max-time 0.5 --time-budget 240 "$@" || status=$?
echo "gpu.sh: done, exit ${status}; results in ${out_dir}"
exit "$status"
