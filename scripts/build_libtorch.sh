#!/usr/bin/env bash
# Builds the operator library with CMake against the installed libtorch, then checks it from C++
# (grad_ext_cpp_demo) and from Python (torch.ops.load_library, without importing grad_ext).
# Usage: scripts/build_libtorch.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-cmake}
source scripts/torch_cmake.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${TORCH_CMAKE_ARGS[@]}"
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
