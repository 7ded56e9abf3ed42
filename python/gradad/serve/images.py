"""Images in and out of the service: an uploaded body checked and decoded (its size in pixels
read from the header before any pixel is decoded), and the heatmap and overlay PNGs stored for
each inspection. numpy and Pillow only."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..deploy.images import heatmap_overlay, load_image, resize_map

__all__ = ["ImageRejected", "decode_image", "preview_pngs"]

# Pillow format -> the suffix a kept image is stored with
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}


class ImageRejected(ValueError):
    """An image the service refuses, with the HTTP status that says why (413, 415 or 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> tuple:
    """An image file's bytes -> ((H, W, 3) uint8 RGB, the suffix to keep it under).

    Raises :class:`ImageRejected`: 422 for no bytes at all, bytes that are no image format Pillow
    knows, or a truncated or corrupt file; 413 for an image of more than ``max_pixels`` pixels
    (checked from the header, so a decompression bomb is never decoded)."""
    if not data:
        raise ImageRejected(422, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(413, f"the image has {width} x {height} = {width * height} pixels; this "
                                             f"service takes at most {max_pixels} (--max-pixels)")
                suffix = SUFFIXES.get(img.format or "", ".img")
                rgb = load_image(img)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(413, f"the image is too large to decode: {error}") from None
    except UnidentifiedImageError:
        raise ImageRejected(422, "the data is not an image in a format this service reads "
                                 "(PNG, JPEG, BMP, TIFF, WebP, GIF)") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as error:
        raise ImageRejected(422, f"the image cannot be decoded (truncated or corrupt?): {error}") from None
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageRejected(422, f"the image is {rgb.shape[1]} x {rgb.shape[0]} pixels; at least 2 x 2 is needed")
    return rgb, suffix


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # speed over size (written for every image): zlib level 1 with Huffman coding only (compress_type 2,
    # Z_HUFFMAN_ONLY) is about a third faster than level 1 alone on camera images, and no larger
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1, compress_type=2)
    return buffer.getvalue()


def preview_pngs(rgb: np.ndarray, amap: np.ndarray, threshold: float, side: int) -> tuple:
    """(heatmap PNG, overlay PNG) bytes of an image (H, W, 3) uint8 and its anomaly map (h, w),
    shrunk so the longer side is at most ``side``. The colour scale runs from 0 to twice the
    threshold (as ``gradad predict`` draws it), or over the map's own range when the threshold is
    not positive."""
    height, width = rgb.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        amap = resize_map(np.asarray(amap, dtype=np.float32), size[1], size[0])
    lo, hi = (0.0, 2.0 * threshold) if threshold > 0 else (float(np.min(amap)), float(np.max(amap)))
    colours, overlay = heatmap_overlay(rgb, amap, lo, hi)
    return _png(colours), _png(overlay)
