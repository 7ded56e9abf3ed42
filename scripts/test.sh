#!/usr/bin/env bash
# Sets up this checkout on a fresh machine and runs every test:
#   1. installs torch from the package index and the project with its test dependencies,
#      building grad_ext (CPU kernels always; CUDA kernels when torch has CUDA and nvcc is
#      found, or always with GRAD_EXT_CUDA=1, which then fails loudly if it cannot);
#   2. builds the operator library with CMake against libtorch and loads it from C++ and Python;
#   3. runs pytest (GPU tests are skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-2}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export TORCH_CUDA_ARCH_LIST="9.0"  # no GPU to detect: compile for Hopper
fi
python -m pip install --quiet torch torchvision ninja setuptools wheel
python -m pip install --quiet --no-build-isolation -e ".[test]"
python -c "import grad_ext, json; print(json.dumps(grad_ext.info()))"
if [ "${GRAD_EXT_CUDA:-}" = 1 ]; then
  python -c "import grad_ext, sys; sys.exit(0 if grad_ext.info()['cuda'] else 'CUDA kernels were asked for but not built')"
fi
bash scripts/build_libtorch.sh build-cmake
python -m pytest -q tests "$@"
