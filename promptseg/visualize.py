"""Pictures people can look at: CAM heatmaps and mask overlays (numpy + Pillow only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .data.palette import voc_palette


def heatmap(values: np.ndarray) -> np.ndarray:
    """``H x W`` values in 0..1 -> ``H x W x 3`` uint8 with a jet-like colour ramp."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def blend(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Image with its class mask painted in VOC colours; background pixels keep the image."""
    coloured = voc_palette()[mask]
    painted = blend(image, coloured, alpha)
    return np.where((mask == 0)[..., None], image, painted)


def gallery(rows: Sequence[Sequence[np.ndarray]], scale: int = 3, gap: int = 2) -> Image.Image:
    """Grid of equally sized ``H x W x 3`` tiles, one list per row, upscaled for viewing."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (height + gap), columns * (width + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (height + gap): i * (height + gap) + height, j * (width + gap): j * (width + gap) + width] = tile
    image = Image.fromarray(canvas)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
