"""Image files on disk: which suffixes are images, the image files of a folder or of a mix of
files and folders, and the choices for a file that cannot be read. Standard library only, so
the datasets and the torch-free predict of an exported model (gradad.deploy) share one copy."""

from __future__ import annotations

import os
from typing import List, Sequence

# Suffixes treated as images when a folder is scanned (compared lower-cased).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# What an unreadable image does: stop with an error, or be left out with a warning.
ON_ERROR_CHOICES = ("raise", "skip")


def list_image_files(folder: str | os.PathLike) -> List[str]:
    """Sorted paths of the image files directly inside ``folder`` (not recursive)."""
    folder = os.fspath(folder)
    names = sorted(name for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
    return [os.path.join(folder, name) for name in names]


def collect_images(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> List[str]:
    """Image files named by ``paths``: files as given, folders by their image files (not
    recursive, suffixes IMAGE_EXTENSIONS), each file once. A missing path or an empty folder
    raises."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no image files or folders given to predict on")
    files: List[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = list_image_files(path)
            if not found:
                raise ValueError(f"folder {path} holds no image files (suffixes {', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image file or folder not found: {path}")
    return list(dict.fromkeys(files))
