"""Reading images and masks from disk, and resizing them the way the model sees them."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .records import ImageRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
# Modes Pillow converts to 8-bit RGB without losing range.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# Masks whose extra band is alpha: only the first bands carry the label.
_ALPHA_MASK_BANDS = {"LA": 1, "PA": 1, "RGBA": 3}


class UnreadableImageError(OSError):
    """An image or mask file exists but cannot be decoded."""


def image_size_of(path: str) -> tuple[int, int]:
    """(H, W) of an image file from its header (pixels are not decoded)."""
    with _open(path) as img:
        return img.height, img.width


def check_image_file(path: str, full_decode: bool = False) -> tuple[int, int]:
    """Check that `path` is a readable image and return its (H, W).

    full_decode=False opens the header and runs Pillow's verify() (for PNG and JPEG it walks
    the file's structure and notices truncation, without decompressing pixels);
    full_decode=True decodes every pixel. Raises FileNotFoundError or UnreadableImageError.
    """
    with _open(path) as img:
        size = img.height, img.width
        try:
            if full_decode:
                img.load()
            else:
                img.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableImageError(f"cannot read image file {path}: {exc}") from exc
    return size


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 array (grayscale is repeated to 3 channels).

    16-bit grayscale is scaled to 8 bit (value / 257); 32-bit integer or float images raise
    ValueError because their range is unknown.
    """
    with _open(path) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableImageError(f"cannot read image file {path}: {exc}") from exc
        if img.mode in _EIGHT_BIT_MODES:
            return np.array(img.convert("RGB"))
        values = np.asarray(img)
        # 16-bit grayscale: Pillow opens it as I;16* or, for some files, as 32-bit "I" whose
        # values still fit 16 bits
        if img.mode.startswith("I;16") or (img.mode == "I" and values.size and 0 <= values.min()
                                           and values.max() <= 65535):
            gray = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        raise ValueError(f"unsupported image mode {img.mode!r} in {path}: expected an 8- or 16-bit image")


def read_mask(mask_path: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a mask file to an (H, W) bool array: True where the value is non-zero.

    Any non-zero value counts (VisA masks hold small class values, not 255); for colour masks
    any non-zero colour channel counts, alpha is ignored. If expected_size (H, W) is given and
    differs from the mask's size, ValueError names the mask file.
    """
    with _open(mask_path) as img:
        try:
            values = np.asarray(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableImageError(f"cannot read mask file {mask_path}: {exc}") from exc
        mode = img.mode
    if mode in _ALPHA_MASK_BANDS:
        values = values[..., : _ALPHA_MASK_BANDS[mode]]
    mask = values.any(axis=2) if values.ndim == 3 else values != 0
    if expected_size is not None and mask.shape != tuple(expected_size):
        raise ValueError(
            f"mask {mask_path} has size (H, W) = {mask.shape}, but its image has size {tuple(expected_size)}"
        )
    return mask


def check_mask_size(mask_path: str, image_path: str, image_size: tuple[int, int] | None = None) -> None:
    """Raise ValueError naming the mask file if its header size differs from the image's."""
    if image_size is None:
        image_size = image_size_of(image_path)
    mask_size = image_size_of(mask_path)
    if mask_size != tuple(image_size):
        raise ValueError(
            f"mask {mask_path} has size (H, W) = {mask_size}, but image {image_path} has size {tuple(image_size)}"
        )


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (3, H, W) float tensor to `size` (H, W): bilinear with antialiasing (like PIL)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, H, W) {0,1} float tensor to `size` with nearest neighbour (PIL's pixel-centre rule)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None], size=size, mode="nearest-exact")[0]


def load_rgb(record: ImageRecord | str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """The un-normalised image as an (H, W, 3) uint8 array, for overlays.

    size: None keeps the original resolution; an int S or (H, W) resizes it with the same
    bilinear antialiased resize the model input gets.
    """
    path = record.path if isinstance(record, ImageRecord) else os.fspath(record)
    rgb = read_rgb(path)
    if size is None:
        return rgb
    target = (size, size) if isinstance(size, int) else tuple(size)
    resized = resize_image(torch.from_numpy(rgb).permute(2, 0, 1).float(), target)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def load_mask(record: ImageRecord) -> np.ndarray | None:
    """The ground-truth mask at the image's full resolution as an (H, W) bool array.

    A normal image without a mask file gets all False; an anomalous image without a mask
    file returns None (no pixel ground truth). A mask whose size differs from the image
    raises ValueError naming the mask file.
    """
    if record.mask_path is None:
        return np.zeros(image_size_of(record.path), dtype=bool) if record.label == 0 else None
    return read_mask(record.mask_path, expected_size=image_size_of(record.path))


def _open(path: str) -> Image.Image:
    """Image.open with errors that name the file (FileNotFoundError passes through)."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot read image file {path}: {exc}") from exc
