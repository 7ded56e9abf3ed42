"""Atomic file writes (a temporary file in the target's folder, then ``os.replace``) and file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished files get the usual permissions instead.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The folder must exist. On any error the temporary file is removed and ``path`` is left
    as it was. Returns the path.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` (encoded with ``encoding``) to ``path``; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def hash_file(path: str | os.PathLike, digest=None):
    """``digest`` (default: a new SHA-256) updated with the bytes of the file at ``path``, read in
    1 MiB chunks; returns the digest (``.hexdigest()`` for the text)."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest

