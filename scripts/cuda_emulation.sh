#!/usr/bin/env bash
# The CUDA kernels without a GPU. Builds csrc/cuda as host C++ under the CPU emulation of CUDA's
# execution model (csrc/cuda/emulation; README "CUDA kernels without a GPU") twice, and runs
# tests/test_cuda_emulation.py against each build:
#   1. AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds accesses, misaligned
#      accesses, use after free, undefined arithmetic;
#   2. ThreadSanitizer: data races on shared or global memory (a missing __syncthreads, a plain
#      add where an atomic is needed).
# The emulation itself fails a launch that CUDA would refuse or a block whose threads misuse
# __syncthreads or the warp shuffles. Any failure or sanitizer report makes the exit status
# non-zero. Build outputs stay in build-emulation/ and are reused while the sources are unchanged.
#
#   bash scripts/cuda_emulation.sh [pytest args]    e.g. -k refine, or -x
#
# Needs the project installed (the README's test command does it), g++ with its sanitizer
# runtimes, CMake and ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter itself, not a wrapper script: the sanitizer runtime is preloaded into it.
PY=$(python -c 'import sys; print(sys.executable)')
source scripts/torch_cmake.sh
jobs=${MAX_JOBS:-$(nproc)}

# run_suite TITLE SANITIZER PRELOAD OPTIONS...: build build-emulation/SANITIZER, run the tests.
run_suite() {
  local title=$1 sanitizer=$2 preload=$3 dir=build-emulation/$2
  shift 3
  echo "=== CUDA emulation with $title ==="
  cmake -S . -B "$dir" -G Ninja -DGRAD_EXT_CUDA_EMULATION=ON -DGRAD_EXT_SANITIZE="$sanitizer" \
    "${TORCH_CMAKE_ARGS[@]}" >/dev/null
  cmake --build "$dir" --target grad_ext_emulated -j "$jobs"
  env GRAD_EXT_EMULATION_LIBRARY="$PWD/$dir/libgrad_ext_emulated.so" LD_PRELOAD="$preload" "$@" \
    "$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/test_cuda_emulation.py "${pytest_args[@]}"
}

pytest_args=("$@")
status=0
# libstdc++ is preloaded with ASan so that the sanitizer finds the C++ runtime's functions it wraps.
run_suite "AddressSanitizer + UndefinedBehaviorSanitizer" address \
  "$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" || status=1
# PyTorch's own host-side parallel loops (OpenMP) are single-threaded here: libgomp is not built
# with ThreadSanitizer, which cannot see its synchronisation and would report races inside torch.
run_suite ThreadSanitizer thread "$(g++ -print-file-name=libtsan.so)" OMP_NUM_THREADS=1 \
  TSAN_OPTIONS="halt_on_error=1:report_thread_leaks=0:detect_deadlocks=0:report_signal_unsafe=0" || status=1
exit $status
