"""Pre- and post-processing in numpy, written once for every backend, the calibrator and the tests.

The graphs take ``N x 3 x H x W float32`` RGB in 0..1 and return outputs at the same ``H x W``
(see :mod:`promptseg.runtime.spec`), so host work is: decode, scale, stack images of one size,
and turn label maps into palette PNGs and overlays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import PromptsegError


def to_chw01(image_u8: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``3 x H x W`` float32 in 0..1 (what the graph's ``image`` takes)."""
    if image_u8.ndim != 3 or image_u8.shape[2] != 3 or image_u8.dtype != np.uint8:
        raise PromptsegError(f"image: got {image_u8.dtype} {image_u8.shape} | expected uint8 (H, W, 3) RGB")
    return np.ascontiguousarray(image_u8.transpose(2, 0, 1), dtype=np.float32) * np.float32(1 / 255)


def stack_batch(images_u8: Sequence[np.ndarray]) -> np.ndarray:
    """Images of one size -> ``N x 3 x H x W float32`` 0..1; mixed sizes are an error (group them first)."""
    if not images_u8:
        raise PromptsegError("batch: got no images | expected at least one")
    sizes = {im.shape[:2] for im in images_u8}
    if len(sizes) != 1:
        raise PromptsegError(f"batch: images of sizes {sorted(sizes)} | expected one size (group_by_size first)")
    return np.stack([to_chw01(im) for im in images_u8])


def group_by_size(shapes: Sequence[tuple[int, int]], batch: int) -> list[list[int]]:
    """Indices of images batched together: same ``(H, W)`` only, at most ``batch`` each, input order kept."""
    if batch < 1:
        raise PromptsegError(f"batch: got {batch} | expected >= 1")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    batches = []
    for indices in groups.values():
        batches.extend(indices[i:i + batch] for i in range(0, len(indices), batch))
    return sorted(batches, key=lambda b: b[0])


def resize_to_fit(image_u8: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (bilinear, aspect kept) so the longer side is at most ``max_side``; smaller images pass."""
    h, w = image_u8.shape[:2]
    if max(h, w) <= max_side:
        return image_u8
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image_u8).resize(size, Image.BILINEAR))


def fit_sides(image_u8: np.ndarray, min_side: int, max_side: int) -> np.ndarray:
    """The host resize policy: downscale so the longer side is at most ``max_side``, then upscale
    (bilinear, aspect kept) so the shorter side is at least ``min_side``; labels are resized back to
    the original size afterwards. An aspect ratio that cannot fit both bounds is an error."""
    height, width = image_u8.shape[:2]
    image_u8 = resize_to_fit(image_u8, max_side)
    h, w = image_u8.shape[:2]
    if min(h, w) >= min_side:
        return image_u8
    scale = min_side / min(h, w)
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    if max(size) > max_side:
        raise PromptsegError(f"image {width}x{height} (WxH): aspect ratio above {max_side // min_side}:1 | "
                             f"expected sides that fit {min_side}..{max_side} after scaling")
    return np.asarray(Image.fromarray(image_u8).resize(size, Image.BILINEAR))


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` label map (ids must stay ids)."""
    if labels.shape == tuple(size_hw):
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size_hw[1], size_hw[0]), Image.NEAREST))


def cams_to_mask(cams: np.ndarray, threshold: float) -> np.ndarray:
    """``C x H x W`` maps in 0..1 -> ``H x W`` uint8 ids: the argmax class where the strongest map
    exceeds ``threshold``, else 0 = background (how CAMs become pseudo-masks, in training and on the device)."""
    return mask_from_peak(cams.max(0), (cams.argmax(0) + 1).astype(np.uint8), threshold)


def mask_from_peak(peak: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`cams_to_mask` from a precomputed peak map and argmax ids (one argmax for many thresholds)."""
    return np.where(peak > threshold, ids, np.uint8(0))


def labels_to_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """``H x W`` integer ids -> a palette PNG image whose colours are the model's palette."""
    if labels.ndim != 2:
        raise PromptsegError(f"labels: got shape {labels.shape} | expected (H, W)")
    if labels.size and (labels.min() < 0 or labels.max() >= len(palette)):
        raise PromptsegError(f"labels: ids {labels.min()}..{labels.max()} | expected 0..{len(palette) - 1}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [int(c) for rgb in palette for c in rgb]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def overlay(image_u8: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> np.ndarray:
    """The image with non-background labels tinted by their palette colour: ``H x W x 3`` uint8."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blended = image_u8.astype(np.float32) * (1 - alpha) + colours * alpha
    out = np.where((labels > 0)[..., None], blended, image_u8.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
