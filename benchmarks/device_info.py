"""What the benchmarks ran on: device name and folder slug, software versions, git commit, and
the device's measured copy bandwidth and matrix-multiply throughput (the roofs of the roofline)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import Dict, Optional

import torch

from gradad.runtime import resolve_device  # noqa: F401 (the benchmarks' device names are gradad's)

from .allocators import current_allocator
from .timing import TimingSettings, measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Copy-bandwidth probe: one float32 tensor copied into another, each this large.
CPU_COPY_BYTES = 256 << 20
CUDA_COPY_BYTES = 1 << 30
# Throughput probe: a float32 square matrix product of this side.
CPU_MATMUL_SIDE = 1024
CUDA_MATMUL_SIDE = 8192


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable name: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def slugify(text: str) -> str:
    """Lower-case words joined by '-': 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def device_slug(device: torch.device) -> str:
    """Folder name for a device's results: 'cpu-<model>' or the GPU name, slugified."""
    name = device_name(device)
    return slugify(name) if device.type == "cuda" else "cpu-" + slugify(name)


def git_commit() -> Dict[str, Optional[object]]:
    """The repository's HEAD commit and whether tracked files differ from it (None outside git)."""
    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def load_average() -> Optional[list]:
    """The system's 1, 5 and 15-minute load averages (how busy a shared machine was), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """Device, versions, threads and commit, for results.json."""
    import grad_ext

    info = {
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "grad_ext": grad_ext.info(),
        "git": git_commit(),
        "allocator": current_allocator(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = props.total_memory / 2**30
        info["gpu_sm_count"] = props.multi_processor_count
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def measure_copy_bandwidth(device: torch.device, settings: TimingSettings,
                           nbytes: Optional[int] = None) -> Dict[str, float]:
    """Bandwidth of ``dst.copy_(src)`` for two float32 tensors of ``nbytes`` each (default
    :data:`CPU_COPY_BYTES` / :data:`CUDA_COPY_BYTES`), timed like every kernel. Bytes moved =
    2 * nbytes (src read once, dst written once). Returns {'bytes', 'median_s', 'gbps'}."""
    nbytes = nbytes or (CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES)
    numel = nbytes // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda i: dst.copy_(src), device, settings)
    moved = 2 * numel * 4
    return {"bytes": moved, "median_s": timing.median_s, "gbps": moved / timing.median_s / 1e9, "reps": timing.reps}


def measure_matmul_throughput(device: torch.device, settings: TimingSettings,
                              side: Optional[int] = None) -> Dict[str, float]:
    """float32 GFLOP/s of a ``side`` x ``side`` matrix product (2 * side^3 FLOPs), the compute
    roof of the roofline. Returns {'side', 'median_s', 'gflops'}."""
    side = side or (CUDA_MATMUL_SIDE if device.type == "cuda" else CPU_MATMUL_SIDE)
    a = torch.rand(side, side, device=device)
    b = torch.rand(side, side, device=device)
    out = torch.empty(side, side, device=device)
    timing = measure(lambda i: torch.mm(a, b, out=out), device, settings)
    return {"side": side, "median_s": timing.median_s, "gflops": 2 * side**3 / timing.median_s / 1e9,
            "tf32": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)}
