"""Image and mask loading with errors that name the file and say what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .palette import palette_bytes


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB, converting grey, palette, RGBA and CMYK."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I") :
                array = np.asarray(img, dtype=np.float64)
                peak = array.max() if array.size and array.max() > 0 else 1.0
                grey = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a class-id mask (palette PNG or grey PNG) as ``H x W`` uint8 ids, 255 = ignore."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: mask mode {img.mode!r} | expected a palette ('P') or grey ('L') PNG of class ids"
                )
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable mask ({exc})") from None


def mask_to_png_image(mask: np.ndarray) -> Image.Image:
    """A ``H x W`` uint8 id mask as a VOC-palette PIL image."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DataError(f"mask: got shape {mask.shape} dtype {mask.dtype} | expected H x W uint8")
    img = Image.fromarray(mask, mode="P")
    img.putpalette(palette_bytes())
    return img
