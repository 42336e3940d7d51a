"""Pre- and post-processing in numpy, written once for every backend, the calibrator and the tests.

The graphs take ``N x 3 x H x W float32`` RGB in 0..1 and return outputs at the same ``H x W``
(see :mod:`promptseg.runtime.spec`). ``infer`` feeds every frame at the network's own input size
(resized once on the host, so the graph's inner resize is the identity and the outputs are small)
and brings the labels to the frame's size with :func:`upsample_labels`, which gives the argmax of
the bilinearly upsampled logits exactly but interpolates only where labels meet.
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


# Frames are decoded reduced (JPEG DCT scaling, a video frame scaled down by FFmpeg) to no less than this many
# times the network's input side, then sampled as the graph samples. Measured on 1080p frames for the 64 px demo
# segmenter: 1/2-scale decoding (8x) kept 99.95% of the labels of a full decode (mIoU 73.48 vs 73.50) at a third of
# the decode time; 1/4 (4x) 99.93%. Antialiased resizing to the network's size instead lost 1.9 mIoU: the network
# was trained on what the graph's own bilinear sampling gives it.
DECODE_AT_LEAST = 8


def decode_size(model_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(W, H)`` a frame must keep when decoded reduced for a network of input ``(H, W)``."""
    return model_hw[1] * DECODE_AT_LEAST, model_hw[0] * DECODE_AT_LEAST


def to_model_size(image: Image.Image | np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """An RGB frame sampled to the network's ``(H, W)`` as the graph's own resize samples it (bilinear,
    half-pixel centres, no antialiasing: ONNX ``Resize`` / ``F.interpolate(align_corners=False)``), so a
    frame fed at the network's size gives the graph what a full-size frame would: ``H x W x 3`` uint8."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if (height, width) == tuple(size_hw):
        return pixels
    y0, y1, wy = _half_pixel_taps(height, size_hw[0])
    x0, x1, wx = _half_pixel_taps(width, size_hw[1])
    rows = pixels[np.concatenate([y0, y1])].astype(np.float32)
    cols = rows[:, x0] + (rows[:, x1] - rows[:, x0]) * wx[None, :, None]
    top, bottom = cols[: len(y0)], cols[len(y0):]
    return np.rint(top + (bottom - top) * wy[:, None, None]).astype(np.uint8)


def _half_pixel_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps and weight of bilinear resizing with half-pixel centres (``align_corners=False``,
    the graph's ``Resize``): output ``d`` reads ``i0``/``i1`` with weight ``w1`` on ``i1``."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample_labels(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``C x h x w`` logits -> ``H x W`` uint8 labels: the argmax of the logits resized bilinearly
    (half-pixel centres) to ``size_hw``, as a graph that resized its logits would give.

    Bilinear interpolation is a convex combination of four neighbours, so where all four share one
    argmax the interpolated argmax is that label too: those pixels repeat the low-resolution labels,
    and only the columns of each band of rows that cross cells of different labels are interpolated
    (rows first, then the band), a few percent of a 1080p frame."""
    if logits.ndim != 3:
        raise PromptsegError(f"logits: got shape {logits.shape} | expected (C, h, w)")
    channels, h, w = logits.shape
    if channels > 256:
        raise PromptsegError(f"logits: {channels} classes | expected at most 256 (uint8 labels)")
    height, width = size_hw
    low = logits.argmax(0).astype(np.uint8)
    y0, _, wy = _half_pixel_taps(h, height)
    x0, x1, wx = _half_pixel_taps(w, width)
    next_col, next_row = np.minimum(np.arange(w) + 1, w - 1), np.minimum(np.arange(h) + 1, h - 1)
    right, down = low[:, next_col], low[next_row]
    mixed_cells = (low != right) | (low != down) | (low != down[:, next_col])
    labels = np.repeat(np.repeat(low, np.bincount(y0, minlength=h), 0), np.bincount(x0, minlength=w), 1)
    rows = np.flatnonzero(mixed_cells.any(1))
    band_start = np.searchsorted(y0, np.arange(h + 1))  # output rows [band_start[r], band_start[r+1]) read row r
    for r in rows:
        top, bottom = band_start[r], band_start[r + 1]
        cols = np.flatnonzero(mixed_cells[r, x0])
        if top == bottom or cols.size == 0:
            continue
        pair = logits[:, (r, next_row[r])]  # C x 2 x w: the band's two source rows, resized along x
        left, right_tap = pair[:, :, x0[cols]], pair[:, :, x1[cols]]
        across = left + (right_tap - left) * wx[cols]
        upper, lower = across[:, 0], across[:, 1]
        band = upper[:, None] + (lower - upper)[:, None] * wy[top:bottom, None]  # C x rows x cols
        labels[top:bottom, cols] = _argmax_first_axis(band)
    return labels


def _argmax_first_axis(values: np.ndarray) -> np.ndarray:
    """``argmax(0)`` as a running maximum over the (few) classes: numpy's argmax along a leading axis
    copies the array first; ties keep the first class, as argmax does."""
    best, index = values[0].copy(), np.zeros(values.shape[1:], np.uint8)
    for c in range(1, len(values)):
        higher = values[c] > best
        np.copyto(best, values[c], where=higher)
        index[higher] = c
    return index


def present_classes(labels: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """The names of the classes ``labels`` holds, in id order. One vectorised comparison per class:
    ``np.bincount`` / ``np.unique`` of a 1080p map cost 35 ms, this 2 ms."""
    return [name for c, name in enumerate(class_names) if (labels == c).any()]


def encode_mask_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """A palette PNG of ``labels``, written fast: 4-bit when the palette fits (half the bytes to filter
    and deflate), zlib's fastest level; lossless like any PNG (1080p label map: 7.6 ms, 8 KB)."""
    import io

    image = labels_to_png(labels, palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", bits=4 if len(palette) <= 16 else 8, compress_level=1)
    return buffer.getvalue()


def _foreground_box(labels: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` bounding the non-background labels, or None when there are none."""
    rows, cols = np.flatnonzero(labels.any(1)), np.flatnonzero(labels.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def tint_in_place(image: Image.Image, labels: np.ndarray, palette: Sequence[Sequence[int]],
                  alpha: float = 0.5) -> Image.Image:
    """:func:`overlay` by Pillow's C code, on the frame itself (returned): non-background labels tinted
    by their palette colour. Only the box around the foreground is blended."""
    box = _foreground_box(labels)
    if box is None:
        return image
    x0, y0, x1, y1 = box
    inside = labels[y0:y1, x0:x1]
    colours = labels_to_png(inside, palette).convert("RGB")
    mask = Image.fromarray(inside.astype(np.uint8), mode="L").point([0] + [round(255 * alpha)] * 255)
    image.paste(Image.composite(colours, image.crop(box), mask), box)
    return image


def _bt601(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Palette colours as limited-range BT.601 ``Y, Cb, Cr`` (what FFmpeg assumes for untagged video)."""
    rgb = np.asarray(palette, dtype=np.float64)
    matrix = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255
    return np.clip(np.rint(rgb @ matrix.T + [16, 128, 128]), 0, 255).astype(np.uint16)


def tint_yuv420_in_place(planes: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
                         alpha: float = 0.5) -> np.ndarray:
    """The overlay tint applied to a video frame in its own ``yuv420p`` planes (PyAV's ``H*3/2 x W``
    layout): the blend is linear, so it holds in YUV as in RGB, and the frame never goes through RGB.
    Chroma takes the label of the top-left pixel of each 2x2 block. Even ``H`` and ``W`` only."""
    height, width = labels.shape
    if height % 2 or width % 2 or planes.shape != (height * 3 // 2, width):
        raise PromptsegError(f"yuv420p planes: got {planes.shape} for labels {labels.shape} | expected "
                             f"({height * 3 // 2}, {width}) with even sides")
    box = _foreground_box(labels)
    if box is None:
        return planes
    colours, weight = _bt601(palette), round(256 * alpha)
    quarter = height * width // 4
    chroma = planes[height:].reshape(-1)
    views = [(planes[:height], labels, colours[:, 0])]
    for k in (1, 2):
        views.append((chroma[(k - 1) * quarter: k * quarter].reshape(height // 2, width // 2), labels[::2, ::2],
                      colours[:, k]))
    for plane, plane_labels, lut in views:
        scale = plane.shape[0] / height
        x0, y0 = int(box[0] * scale), int(box[1] * scale)
        x1, y1 = -(-box[2] * plane.shape[1] // width), -(-box[3] * plane.shape[0] // height)
        for top in range(y0, y1, _TINT_ROWS):  # strips: the uint16 temporaries stay small in every worker
            bottom = min(top + _TINT_ROWS, y1)
            region, inside = plane[top:bottom, x0:x1], plane_labels[top:bottom, x0:x1]
            tinted = (region.astype(np.uint16) * (256 - weight) + lut[inside] * weight + 128) >> 8
            np.copyto(region, tinted.astype(np.uint8), where=inside > 0)
    return planes


_TINT_ROWS = 64  # rows per strip of the yuv tint: a 1080p luma strip's temporaries are ~0.25 MB each
