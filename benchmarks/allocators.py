"""The CPU memory allocator settings the benchmarks run under, and how a child process gets one.

An allocator is chosen when a process starts (glibc reads GLIBC_TUNABLES and the dynamic
loader LD_PRELOAD before any Python runs), so a benchmark under another setting is a child
process. Both sides of a comparison always run in the same process, so they always share one
setting; what a setting changes is how often a large tensor gets fresh pages from the OS,
whose first touch (a page fault and a page clear per 4 KiB) can cost more than the kernel that
writes the tensor.

Settings (:data:`SETTINGS`):

* ``glibc``: the system's malloc as it comes. Allocations of 32 MiB and more (the dynamic
  threshold's ceiling) are fresh mappings every time, and freed heap above 128 KiB at the top
  is handed back to the OS.
* ``glibc-tuned``: the same malloc told to keep large blocks in its heap and not to trim it
  (:data:`GLIBC_TUNED`), so that a freed buffer serves the next allocation of its size.
* ``jemalloc`` / ``tcmalloc``: Debian's libjemalloc2 / libtcmalloc-minimal4 preloaded.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

GLIBC_TUNED = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
# Folders a Debian/Ubuntu (or other multiarch) system keeps its shared libraries in.
LIBRARY_GLOBS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/*-linux-gnu")
# The variables a setting owns: removed from the parent's environment before one is applied.
OWNED_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD")


@dataclass(frozen=True)
class AllocatorSetting:
    """name: the setting's key; title: how tables name it; tunables: GLIBC_TUNABLES;
    library: a shared library to preload (file name); package: the Debian package that has it."""

    name: str
    title: str
    tunables: Optional[str] = None
    library: Optional[str] = None
    package: Optional[str] = None


SETTINGS: Dict[str, AllocatorSetting] = {s.name: s for s in (
    AllocatorSetting("glibc", "glibc (default)"),
    AllocatorSetting("glibc-tuned", "glibc tuned", tunables=GLIBC_TUNED),
    AllocatorSetting("jemalloc", "jemalloc", library="libjemalloc.so.2", package="libjemalloc2"),
    AllocatorSetting("tcmalloc", "tcmalloc", library="libtcmalloc_minimal.so.4", package="libtcmalloc-minimal4"),
)}
# run_all's default on the CPU: the allocator as it comes and the best setting that needs no package.
DEFAULT_SETTINGS = ("glibc", "glibc-tuned")


def setting(name: str) -> AllocatorSetting:
    """The setting called ``name`` (ValueError naming the choices otherwise)."""
    if name not in SETTINGS:
        raise ValueError(f"allocator must be one of {sorted(SETTINGS)}, got {name!r}")
    return SETTINGS[name]


def find_library(filename: str) -> Optional[str]:
    """The path of the shared library ``filename`` in the system's library folders, or None."""
    for pattern in LIBRARY_GLOBS:
        for folder in sorted(glob.glob(pattern)):
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
    return None


def allocator_env(name: str, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``base`` (default: this process's environment) with the allocator variables replaced by
    those of setting ``name``, for a child process. FileNotFoundError, naming the Debian package,
    when the setting's library is not installed."""
    chosen = setting(name)
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in OWNED_VARIABLES}
    if chosen.tunables:
        env["GLIBC_TUNABLES"] = chosen.tunables
    if chosen.library:
        path = find_library(chosen.library)
        if path is None:
            raise FileNotFoundError(f"allocator {name!r} needs {chosen.library}, which is not installed "
                                    f"(Debian/Ubuntu: apt-get install {chosen.package})")
        env["LD_PRELOAD"] = path
    return env


def current_allocator(env: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[str]]:
    """The setting this process runs under, for results files: its name (``custom`` when the
    variables match no setting) and the variables themselves."""
    env = os.environ if env is None else env
    tunables, preload = env.get("GLIBC_TUNABLES") or None, env.get("LD_PRELOAD") or None
    library = os.path.basename(preload) if preload else None
    name = next((s.name for s in SETTINGS.values() if s.tunables == tunables and s.library == library), "custom")
    title = SETTINGS[name].title if name in SETTINGS else f"custom (GLIBC_TUNABLES={tunables}, LD_PRELOAD={preload})"
    return {"name": name, "title": title, "GLIBC_TUNABLES": tunables, "LD_PRELOAD": preload}


def check_settings(names: Sequence[str]) -> None:
    """ValueError for an empty, repeated or unknown selection; FileNotFoundError for a missing library
    (before any benchmark starts)."""
    if not names or len(set(names)) != len(names):
        raise ValueError(f"allocators must be a non-empty list without repeats, got {list(names)}")
    for name in names:
        allocator_env(name, {})
