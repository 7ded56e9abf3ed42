"""An environment for a subprocess in which `import torch` fails: a stub `torch` package first
on PYTHONPATH that raises ImportError (and leaves a marker file, so a test can tell whether
anything tried)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def torchless_env(tmp_path: Path, python_path: Sequence[str]) -> tuple[dict, Path]:
    """(environment for subprocess.run, marker file created when something imports torch)
    with the stub first and then ``python_path`` on PYTHONPATH."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    marker = tmp_path / "torch-was-imported"
    (stub / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "raise ImportError('torch is not installed on this machine (test stub)')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), *map(str, python_path)])), marker
