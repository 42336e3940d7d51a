"""The PASCAL VOC colour map, used for every mask PNG promptseg reads or writes."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """VOC's bit-interleaved colour map: ``n x 3`` uint8, id 0 black, 255 the ignore colour."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def palette_bytes() -> list[int]:
    """The palette as Pillow's ``putpalette`` wants it (768 ints)."""
    return voc_palette(256).reshape(-1).tolist()
