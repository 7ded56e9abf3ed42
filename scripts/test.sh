#!/usr/bin/env bash
# Sets up this checkout on a fresh machine and runs every test:
#   1. installs torch from the package index and the project with its test dependencies,
#      building grad_ext (CPU kernels always; CUDA kernels when torch has CUDA and nvcc is
#      found, or always with GRAD_EXT_CUDA=1, which then fails loudly if it cannot);
#   2. checks the style (scripts/lint.sh: ruff, clang-format);
#   3. builds the operator library with CMake against libtorch and loads it from C++ and Python;
#   4. runs pytest (GPU tests are skipped without a GPU);
#   5. runs the CUDA kernels on the CPU under the emulation and its sanitizers
#      (scripts/cuda_emulation.sh).
# The report.html test opens pages in headless Chromium, and the benchmark tests preload jemalloc
# and tcmalloc: the Debian packages chromium, chromium-driver, libjemalloc2 and libtcmalloc-minimal4
# are installed when missing (as root, or with password-less sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests need: Chromium for report.html and the serve page; jemalloc and
# tcmalloc for the benchmarks' allocator settings (tests/test_benchmarks.py starts children under each).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1 || missing+=(libjemalloc2)
ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo)
  else
    echo "scripts/test.sh: the tests need the Debian packages ${missing[*]} and this user cannot install" \
         "them; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: ${missing[*]} are missing and there is no apt-get to install them;" \
         "install them with this system's package manager" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
export GRADAD_REQUIRE_BROWSER=1  # a browser test that cannot start fails instead of being skipped
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
bash scripts/lint.sh
bash scripts/build_libtorch.sh build-cmake
python -m pytest -q tests "$@"
bash scripts/cuda_emulation.sh
