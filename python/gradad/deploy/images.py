"""Images for the torch-free scorer: decoding to 8-bit RGB and the antialiased bilinear resize
gradad trains with, in numpy and Pillow only.

An image is a path, a PIL image or a uint8/uint16 numpy array (H, W), (H, W, 1), (H, W, 3) or
(H, W, 4), of any size. Grayscale is repeated to RGB, alpha is dropped, 16-bit values are scaled
to 8 bit (v / 257, rounded), palette and other 8-bit modes are converted by Pillow.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["HEATMAP_ALPHA", "heatmap_overlay", "jet_colours", "load_image", "resize_map", "resize_rgb"]

# how much of the colour map shows over the image in an overlay
HEATMAP_ALPHA = 0.5
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}

def _rgb_from_pil(img: Image.Image, what: str) -> np.ndarray:
    img.load()
    if img.mode in _EIGHT_BIT_MODES:
        return np.asarray(img.convert("RGB"))
    if img.mode.startswith("I;16"):
        return _rgb_from_array(np.asarray(img), what)
    raise ValueError(f"{what}: unsupported image mode {img.mode!r}, expected an 8- or 16-bit image")


def _rgb_from_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint16 or (array.dtype.kind == "u" and array.dtype.itemsize == 2):
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{what}: a numpy image must be uint8 or uint16, got {array.dtype} (float arrays "
                        f"are ambiguous between 0..1 and 0..255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(f"{what}: a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                     f"got shape {array.shape}")


def load_image(image, what: str = "image") -> np.ndarray:
    """An image (path, PIL image or uint8/uint16 array) as (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: image file {path} not found")
        try:
            with Image.open(path) as img:
                return _rgb_from_pil(img, f"{what} {path}")
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"{what}: cannot read image file {path}: {exc}") from exc
    if isinstance(image, Image.Image):
        return _rgb_from_pil(image, what)
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image, what)
    raise TypeError(f"{what} must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, height, width) float32 in 0..255, resized with the antialiased
    bilinear filter (Pillow's, per channel in float, as torch's antialias=True computes it)."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    planes = [np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32), mode="F")
                         .resize((width, height), Image.Resampling.BILINEAR)) for c in range(3)]
    return np.stack(planes).astype(np.float32, copy=False)


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float map -> (height, width) float32, bilinear (Pillow's, no antialias below a factor 1)."""
    if amap.shape == (height, width):
        return amap
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((width, height),
                                                                              Image.Resampling.BILINEAR))


def jet_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) in 0..1 -> (H, W, 3) uint8, a jet-like colour ramp (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([red, green, blue], axis=-1) * 255).round().astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> tuple:
    """(colour map, overlay), each (H, W, 3) uint8: the map (h, w), resized bilinearly to the image
    (H, W, 3) uint8 when its size differs, drawn on the scale vmin..vmax, and that drawn over the
    image with alpha :data:`HEATMAP_ALPHA`."""
    amap = resize_map(np.asarray(amap, dtype=np.float32), rgb.shape[0], rgb.shape[1])
    span = vmax - vmin if vmax > vmin else 1.0
    colours = jet_colours((amap - vmin) / span)
    overlay = (1 - HEATMAP_ALPHA) * rgb + HEATMAP_ALPHA * colours
    return colours, overlay.round().astype(np.uint8)
