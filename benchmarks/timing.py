"""Timing and peak-memory measurement on CPU and CUDA.

A measurement calls ``step(i)`` with a running index ``i`` (so that the step can rotate between
input copies): ``warmup`` untimed calls, then repetitions whose number is chosen from the time
of the first timed call so that the measurement takes about ``budget_s`` seconds, clamped to
``[min_reps, max_reps]``. The result is the median. Sides that are compared are measured
interleaved (:func:`measure_interleaved`), so a busy spell of a shared machine slows both.
CUDA calls are timed with CUDA events after ``torch.cuda.synchronize``; CPU calls with
``time.perf_counter``.

Peak memory: CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU the process's
peak resident set size (VmHWM) after resetting it through ``/proc/self/clear_refs`` (Linux), or
``resource.getrusage`` (the whole process's high-water mark) where the reset is not possible.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class TimingSettings:
    """How one measurement is repeated. budget_s: the wanted duration of the timed repetitions
    (of all sides together when sides are interleaved)."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_reps < 1 or self.max_reps < self.min_reps or self.budget_s < 0:
            raise ValueError(f"TimingSettings needs warmup >= 0, 1 <= min_reps <= max_reps and budget_s >= 0, "
                             f"got {self}")


# CPU: few repetitions (a 2-core machine must get through the suite in minutes); CUDA: many.
CPU_TIMING = TimingSettings(warmup=3, min_reps=5, max_reps=15, budget_s=2.0)
CUDA_TIMING = TimingSettings(warmup=10, min_reps=20, max_reps=200, budget_s=1.0)
# Whole-model steps take seconds on a CPU: one warm-up, a median of at least five.
CPU_MODEL_TIMING = TimingSettings(warmup=1, min_reps=5, max_reps=11, budget_s=20.0)
CUDA_MODEL_TIMING = TimingSettings(warmup=5, min_reps=10, max_reps=50, budget_s=2.0)


def default_timing(device: torch.device, model: bool = False) -> TimingSettings:
    """The timing settings for kernels (model=False) or whole-model steps on ``device``."""
    if device.type == "cuda":
        return CUDA_MODEL_TIMING if model else CUDA_TIMING
    return CPU_MODEL_TIMING if model else CPU_TIMING


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, min and max over ``reps`` timed calls after ``warmup`` calls."""

    median_s: float
    min_s: float
    max_s: float
    reps: int
    warmup: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(step: Callable[[int], object], index: int, device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step(index)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step(index)
    return time.perf_counter() - begin


def measure(step: Callable[[int], object], device: torch.device, settings: TimingSettings) -> Timing:
    """Times ``step(i)`` (i = 0, 1, 2, ...) on ``device``; see the module docstring."""
    return measure_interleaved({"step": step}, device, settings)[0]["step"]


def measure_interleaved(steps: Dict[str, Callable[[int], object]], device: torch.device, settings: TimingSettings,
                        peak_memory: bool = False) -> Tuple[Dict[str, Timing], Dict[str, "PeakMemory"]]:
    """Times several steps side by side: warm-up calls of each, then rounds in which every
    step is called once in turn, so that all of them see the same machine load (other
    processes on a shared CPU, GPU clocks). The number of rounds comes from the first round
    and ``settings.budget_s`` (clamped to [min_reps, max_reps]). Returns ({name: Timing},
    {name: PeakMemory of that step's first timed call} when ``peak_memory``, else {})."""
    if not steps:
        raise ValueError("measure_interleaved needs at least one step")
    for index in range(settings.warmup):
        for step in steps.values():
            step(index)
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    memory: Dict[str, PeakMemory] = {}
    index = settings.warmup
    for name, step in steps.items():
        if peak_memory:
            with PeakMemory(device) as memory[name]:
                times[name].append(_time_call(step, index, device))
        else:
            times[name].append(_time_call(step, index, device))
    first_round = sum(t[0] for t in times.values())
    wanted = int(settings.budget_s / first_round) if first_round > 0 else settings.max_reps
    reps = min(max(wanted, settings.min_reps), settings.max_reps)
    for _ in range(reps - 1):
        index += 1
        for name, step in steps.items():
            times[name].append(_time_call(step, index, device))
    timings = {name: Timing(statistics.median(t), min(t), max(t), len(t), settings.warmup) for name, t in times.items()}
    return timings, memory


# ---- caches and input copies ---------------------------------------------------------------

def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the device's last-level cache: the GPU's L2, or the CPU's largest cache level
    (from /sys); 32 MiB when it cannot be read."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    largest = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(base):
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size"), encoding="ascii") as handle:
                    text = handle.read().strip()
            except OSError:
                continue
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            largest = max(largest, value)
    return largest or (32 << 20)


MAX_INPUT_COPIES = 8


def input_copies(bytes_per_copy: int, device: torch.device, max_copies: int = MAX_INPUT_COPIES) -> int:
    """How many copies of a case's inputs to rotate between so that together they exceed twice
    the last-level cache (a call never finds its inputs left in cache by the previous call):
    between 2 and ``max_copies``."""
    wanted = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_copy, 1))
    return max(2, min(max_copies, wanted))


# ---- peak memory ---------------------------------------------------------------------------

def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc malloc_trim) so the baseline RSS is honest."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of the enclosed code on ``device``.

    After exit: ``peak_bytes`` (the high-water mark during the block: allocated CUDA memory, or
    the process's resident set), ``increase_bytes`` (peak minus the amount in use on entry) and
    ``method`` (how it was measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.increase_bytes = 0
        self.method = ""
        self._baseline = 0
        self._per_block = True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _release_free_heap()
            self._per_block = _reset_cpu_peak()
            rss = _read_status_kib("VmRSS")
            self._baseline = (rss or 0) * 1024
            self.method = ("peak RSS (VmHWM after /proc/self/clear_refs reset)" if self._per_block
                           else "peak RSS of the whole process (resource.getrusage ru_maxrss)")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _read_status_kib("VmHWM") if self._per_block else None
            self.peak_bytes = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.increase_bytes = max(0, self.peak_bytes - self._baseline)

    def as_dict(self) -> Dict[str, object]:
        return {"peak_mb": self.peak_bytes / 2**20, "increase_mb": self.increase_bytes / 2**20, "method": self.method}
