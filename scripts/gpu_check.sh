#!/usr/bin/env bash
# One-shot check on a machine with a CUDA GPU and no network, from a fresh copy of the tree:
#   1. build the extension in place for the GPU's architecture (default sm_90) with all cores,
#   2. run every test marked `cuda`,
#   3. run the benchmark suite: the kernels (grid_sample, refine), then the detector with random
#      backbone weights (the offline ImageNet weights are not installed there; timing only),
# printing each phase's wall time, and leave a compact result in $OUT (or ./gpu_check_out):
#   gpu_check.log                      everything printed, the test summary included
#   <device>/results.json results.md   the benchmark figures (written after each part)
#   <device>/*.png                     the benchmark plots
# Each phase has its own time limit so that the whole run ends within about 8 minutes; a phase
# that fails or runs out of time is reported and the next one still runs. Exit status: 0 only
# when the build, the tests and the benchmarks all succeeded.
#
#   OUT=/some/folder bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 GRAD_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUILD_LIMIT=${BUILD_LIMIT:-200}
TEST_LIMIT=${TEST_LIMIT:-110}
KERNEL_BENCH_LIMIT=${KERNEL_BENCH_LIMIT:-100}
DETECTOR_BENCH_LIMIT=${DETECTOR_BENCH_LIMIT:-60}
START=$(date +%s)
STATUS=()

log() { echo "$@" | tee -a "$LOG"; }

# phase NAME LIMIT COMMAND...: runs the command under its time limit, logs output and time.
phase() {
  local name=$1 limit=$2
  shift 2
  local begin=$(date +%s)
  log "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - begin ))
  case $rc in
    0) STATUS+=("$name: ok in ${took}s") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${took}s (limit ${limit}s)") ;;
    *) STATUS+=("$name: FAILED (exit $rc) after ${took}s") ;;
  esac
  log "=== $name: exit $rc, ${took}s (total $(( $(date +%s) - START ))s) ==="
  return "$rc"
}

log "gpu_check at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname), $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

built=0
if phase build "$BUILD_LIMIT" $PY setup.py build_ext --inplace; then
  if phase info 30 $PY -c "import grad_ext, json, sys; i = grad_ext.info(); print(json.dumps(i)); sys.exit(0 if i['cuda'] and i['cuda_available'] else 'CUDA kernels not built or no GPU')"; then
    built=1
  fi
fi
if [ "$built" = 1 ]; then
  so=$(ls grad_ext/_C*.so 2>/dev/null | head -n 1)
  if command -v cuobjdump >/dev/null 2>&1 && [ -n "$so" ]; then
    # Registers, shared memory and spills of each kernel (a function's LOCAL > 0 means spills).
    log "=== kernel resources ==="
    cuobjdump -res-usage "$so" 2>/dev/null | grep -E "Function|REG" | paste - - \
      | sed -E 's/.*Function ([^ :]+).*REG:([0-9]+).*SHARED:([0-9]+).*LOCAL:([0-9]+).*/\2 regs \3 smem \4 local  \1/' \
      | sort -u | head -n 80 | tee -a "$LOG"
  fi
  # Only the files that hold `cuda` tests are collected (the others may need packages this
  # machine lacks, e.g. a browser driver or onnxruntime); a file that cannot be collected is
  # reported without stopping the rest.
  cuda_files=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
  phase cuda-tests "$TEST_LIMIT" $PY -m pytest -q -m cuda $cuda_files -p no:cacheprovider -rfE \
    --continue-on-collection-errors
  phase bench-kernels "$KERNEL_BENCH_LIMIT" $PY benchmarks/run_all.py --out "$OUT" --only grid_sample refine
  phase bench-detector "$DETECTOR_BENCH_LIMIT" $PY benchmarks/run_all.py --out "$OUT" --only detector --merge \
    --detector-weights random
  # The plots of whatever finished (a part cut short by its limit has left its JSON only).
  phase plots 30 $PY -c "
import glob, json, os
from benchmarks.reporting import write_results
for path in glob.glob(os.path.join('$OUT', '*', 'results.json')):
    with open(path) as f:
        write_results(json.load(f), os.path.dirname(path))
    print('plots written to', os.path.dirname(path))
"
fi

log "=== summary (total $(( $(date +%s) - START ))s) ==="
for line in "${STATUS[@]}"; do log "$line"; done
ls -R "$OUT" | tee -a "$LOG" >/dev/null
for line in "${STATUS[@]}"; do
  case $line in *": ok "*) ;; *) exit 1 ;; esac
done
[ "$built" = 1 ] || exit 1
exit 0
