# Sourced by the scripts that build against libtorch with CMake (build_libtorch.sh,
# cuda_emulation.sh): sets TORCH_CMAKE_ARGS, the arguments that find the installed torch. A CUDA
# build of libtorch wants the CUDA toolkit even for CPU-only code; point CMake at it and at the
# nvrtc library that comes with the nvidia pip packages when the toolkit lacks one.
TORCH_CMAKE_ARGS=(-DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')")
if [ "$(python -c 'import torch; print(torch.version.cuda is not None)')" = True ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  TORCH_CMAKE_ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home")
  export CUDACXX=${CUDACXX:-$cuda_home/bin/nvcc}
  if ! ls "$cuda_home"/lib64/libnvrtc.so >/dev/null 2>&1; then
    nvrtc=$(python - <<'PY'
import glob, os, site
hits = [p for r in site.getsitepackages() for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))]
print(sorted(hits)[0] if hits else "")
PY
)
    [ -n "$nvrtc" ] && TORCH_CMAKE_ARGS+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  fi
fi
