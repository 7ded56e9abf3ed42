#!/usr/bin/env bash
# Builds the operator library with CMake against the installed libtorch, then checks it from C++
# (grad_ext_cpp_demo) and from Python (torch.ops.load_library, without importing grad_ext).
# Usage: scripts/build_libtorch.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
# A CUDA build of libtorch wants the CUDA toolkit even for CPU-only code; point CMake at it and
# at the nvrtc library that comes with the nvidia pip packages when the toolkit lacks one.
if [ "$(python -c 'import torch; print(torch.version.cuda is not None)')" = True ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home")
  export CUDACXX=${CUDACXX:-$cuda_home/bin/nvcc}
  if ! ls "$cuda_home"/lib64/libnvrtc.so >/dev/null 2>&1; then
    nvrtc=$(python - <<'PY'
import glob, os, site
hits = [p for r in site.getsitepackages() for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))]
print(sorted(hits)[0] if hits else "")
PY
)
    [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  fi
fi
cmake -S . -B "$build" "${args[@]}"
cmake --build "$build" -j "${MAX_JOBS:-2}"
"$build/grad_ext_cpp_demo" "$build/libgrad_ext_ops.so"
python - "$build/libgrad_ext_ops.so" <<'PY'
import sys
import torch
import torch.nn.functional as F
torch.ops.load_library(sys.argv[1])
table, grid = torch.randn(2, 4, 5, 5), torch.rand(2, 3, 3, 2) * 2 - 1
out = torch.ops.grad_ext.sample_grid(table, grid, 0, 0, False, 0.0, 0.0, 0, None)
err = (out - F.grid_sample(table, grid, align_corners=False)).abs().max().item()
print(f"torch.ops.load_library: grad_ext::sample_grid max |diff| vs F.grid_sample = {err:.3g}")
sys.exit(0 if err < 1e-5 else 1)
PY
