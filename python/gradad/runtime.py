"""Where a run executes: devices, processes (torchrun), and the global random generators.

Owns the device names every config and command accepts (:data:`DEVICE_NAMES`,
:func:`check_device_name`) and the one test of "am I the process that writes files"
(:func:`is_main_process`), so that the CLI, training and inference agree on both.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

# 'auto' is CUDA when torch sees a GPU, else the CPU; 'cuda:N' is also accepted.
DEVICE_NAMES = ("auto", "cpu", "cuda")


def check_device_name(name: str, key: str = "device") -> str:
    """``name`` if it is one of :data:`DEVICE_NAMES` or 'cuda:N', else ValueError naming ``key``."""
    if isinstance(name, str) and (name in DEVICE_NAMES or (name.startswith("cuda:") and name[5:].isdigit())):
        return name
    raise ValueError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → CUDA (device ``local_rank``) when available, else the CPU; 'cpu', 'cuda'
    (→ cuda:``local_rank``) or 'cuda:N'. Asking for CUDA without it is an error."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def is_main_process() -> bool:
    """True unless torchrun started this process with a RANK other than 0 (readable before
    the process group exists, so the CLI can decide who writes the config)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, env:// rendezvous):
    NCCL on CUDA, Gloo on the CPU. Returns the context and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank), device


def finish_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, object]:
    """The global RNG states, in types torch.load(weights_only=True) reads back."""
    numpy_state = np.random.get_state()
    state: Dict[str, object] = {
        "python": list(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    """Restore the states :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
