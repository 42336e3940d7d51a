"""Image and mask loading with errors that name the file and say what is wrong.

Images are read the way a viewer shows them: the EXIF orientation is applied (a phone photo stored
sideways comes out upright, so masks drawn on it or predicted for it follow what people see),
16-bit grey is scaled to 8 bits by a fixed factor, float images must hold 0..1, and every kind of
transparency is composited on the same white background.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .palette import palette_bytes

BACKGROUND = (255, 255, 255)  # what transparent pixels become, whatever the file's mode
_ORIENTATION_TAG = 0x0112  # EXIF "Orientation": 1 upright, 2..8 mirror and/or rotate to display
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 of an open image; 1 (stored upright) when absent or not a valid value."""
    value = img.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_size(path: str | os.PathLike, *, exif: bool = True) -> tuple[int, int]:
    """``(width, height)`` from the header without decoding pixels; with ``exif`` as :func:`load_rgb`
    returns it (orientations 5..8 swap the sides)."""
    path = Path(path)
    with _open_image(path, "unreadable image header") as img:
        width, height = img.size
        if exif and exif_orientation(img) >= 5:
            width, height = height, width
        return width, height


def load_rgb(path: str | os.PathLike, *, exif: bool = True) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB in its displayed orientation.

    Converts grey, palette, CMYK, 16-bit grey (``v / 257``, the same for every image) and float
    images (values must lie in 0..1); transparent pixels (alpha channel or a ``tRNS`` colour) become
    :data:`BACKGROUND`. ``exif=False`` keeps the stored orientation.
    """
    return np.asarray(_load(Path(path), exif, None)[0])


def load_rgb_reduced(path: str | os.PathLike, at_least_wh: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_rgb` as an RGB Pillow image, for a consumer that needs only ``at_least_wh``
    (displayed ``W, H``) pixels: a JPEG decodes at the largest DCT reduction (1/2, 1/4, 1/8) that keeps
    both sides at least that big (Pillow's draft mode: a 1080p frame for a 64 px network decodes 64x
    fewer pixels); other formats decode whole. Returns the image and the full displayed ``(W, H)``."""
    return _load(Path(path), True, at_least_wh)


def _load(path: Path, exif: bool, draft_wh: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    with _open_image(path, "unreadable image") as img:
        rotated = exif and exif_orientation(img) != 1
        sideways = exif and exif_orientation(img) >= 5
        full = img.size[::-1] if sideways else img.size
        if draft_wh is not None:
            img.draft(None, tuple(draft_wh[::-1]) if sideways else tuple(draft_wh))  # in stored orientation
        img.load()
        if rotated:
            img = ImageOps.exif_transpose(img)
        if img.mode == "RGB" and not _has_transparency(img):
            return img, full  # the common case: no conversion, no copy
        return Image.fromarray(_to_rgb(img, path)), full


@contextmanager
def _open_image(path: Path, unreadable: str):
    """``Image.open`` whose failures become :class:`DataError` naming the file (``unreadable``: what to call
    a file Pillow opens but cannot read)."""
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: {unreadable} ({exc})") from None


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """``H x W x 3`` uint8 of a loaded image of any mode (see :func:`load_rgb`)."""
    if img.mode in _INT_MODES or img.mode == "F":
        values = np.asarray(img)
        grey = _int_to_u8(values, img.mode, path) if img.mode in _INT_MODES else _float_to_u8(values, path)
        trns = img.info.get("transparency")
        if isinstance(trns, int) and not isinstance(trns, bool) and img.mode in _INT_MODES:
            alpha = np.where(values == trns, 0, 255).astype(np.uint8)  # a tRNS grey level: fully transparent
            return _composite(Image.fromarray(np.stack([grey, alpha], axis=2), mode="LA"))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if _has_transparency(img):
        return _composite(img)
    return np.asarray(img.convert("RGB"))


def _has_transparency(img: Image.Image) -> bool:
    """An alpha channel, a ``tRNS`` colour or index (``info['transparency']``) or an RGBA palette."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _composite(img: Image.Image) -> np.ndarray:
    """Any mode with transparency over :data:`BACKGROUND`, as ``H x W x 3`` uint8."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def _int_to_u8(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """16-bit grey to 8 bits by ``v / 257`` (65535 -> 255), one fixed scale so images stay comparable;
    mode ``I`` (32-bit) must hold 16-bit values too."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"{path}: {mode!r} integer image values range {values.min()}..{values.max()} | "
            f"expected 0..65535 (16-bit grey)"
        )
    return np.rint(values / 257.0).astype(np.uint8)


def _float_to_u8(values: np.ndarray, path: Path) -> np.ndarray:
    """Float grey in 0..1 to 8 bits by ``v * 255``; any other range is refused, not guessed."""
    values = values.astype(np.float64)
    if values.size and not np.isfinite(values).all():
        raise DataError(f"{path}: float image holds NaN or infinite values | expected finite values in 0..1")
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise DataError(
            f"{path}: float image values range {values.min():g}..{values.max():g} | expected 0..1"
        )
    return np.rint(values * 255.0).astype(np.uint8)


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
