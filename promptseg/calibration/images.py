"""Calibration and gate images: which files, checked up front, fed as the runtime feeds them.

The quantizer sees a re-iterable dataset of ``{"image": N x 3 x H x W float32 RGB 0..1}`` batches
built with :mod:`promptseg.runtime.processing` (decode, ``fit_sides`` to ``MIN_SIDE..max_side``,
``to_chw01``, same-size batches): exactly what the device runtime puts into the graph, whose own
first steps (normalisation, resize to the network's input size) are part of what gets calibrated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..data.images import load_rgb
from ..data.voc import Sample, VOCDataset
from ..errors import DataError
from ..runtime.processing import fit_sides, group_by_size, resize_labels, stack_batch
from ..runtime.sources import IMAGE_SUFFIXES  # the folders `promptseg infer` reads, read alike
from ..runtime.spec import MIN_SIDE

MAX_NAMED_FAILURES = 20


@dataclass(frozen=True, eq=False)
class ImageRef:
    """One image file; ``dataset``/``index`` locate its VOC sample when it came from a split."""

    id: str
    path: Path
    dataset: VOCDataset | None = None
    index: int = -1

    @property
    def sample(self) -> Sample | None:
        return None if self.dataset is None else self.dataset[self.index]

    @cached_property
    def has_mask(self) -> bool:
        return self.dataset is not None and self.dataset[self.index].mask_path is not None

    @property
    def image_labels(self) -> np.ndarray | None:
        """The image-level multi-hot class labels of a VOC sample; None for a loose file."""
        return None if self.dataset is None else self.dataset[self.index].labels

    def load_mask(self) -> np.ndarray:
        """``H x W`` uint8 ids (255 ignore), checked against the image and the class count."""
        sample = self.sample
        if sample is None:
            raise DataError(f"{self.path}: no ground-truth mask (not from a VOC split)")
        return sample.load_mask()


class ImageBatches:
    """A fixed list of images, decoded on demand, in same-size batches of at most ``batch``.

    :meth:`check` decodes every file once and raises one :class:`DataError` naming every
    unreadable one, so a bad file stops the run before calibration starts, not halfway through.
    """

    def __init__(self, refs: Sequence[ImageRef], batch: int = 16, max_side: int = 1024, input_name: str = "image"):
        if not refs:
            raise DataError("images: got none | expected at least one image")
        self.refs = list(refs)
        self.batch = batch
        self.max_side = max_side
        self.input_name = input_name
        self._shapes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.groups())

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.refs]

    def load(self, index: int) -> np.ndarray:
        """``H x W x 3`` uint8 RGB of image ``index`` under the runtime's host resize policy (longer side at
        most ``max_side``, shorter side at least the graph's ``MIN_SIDE``)."""
        return fit_sides(load_rgb(self.refs[index].path), MIN_SIDE, self.max_side)

    def load_mask(self, index: int, size_hw: tuple[int, int]) -> np.ndarray:
        """The mask of image ``index`` at ``size_hw`` (nearest neighbour when the image was downscaled)."""
        return resize_labels(self.refs[index].load_mask(), size_hw)

    def check(self, masks: bool = False) -> ImageBatches:
        """Decode every image (and mask); raise one :class:`DataError` that names every bad file."""
        shapes, failures = [], []
        for i in range(len(self.refs)):
            try:
                image = self.load(i)
                shapes.append(image.shape[:2])
                if masks:
                    self.load_mask(i, image.shape[:2])
            except DataError as exc:
                failures.append(str(exc))
                shapes.append((0, 0))
        if failures:
            shown = "\n  ".join(failures[:MAX_NAMED_FAILURES])
            extra = len(failures) - MAX_NAMED_FAILURES
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            raise DataError(f"{len(failures)} of {len(self.refs)} images unreadable:\n  {shown}{more}")
        self._shapes = shapes
        return self

    def groups(self) -> list[list[int]]:
        """Indices of the images in each batch (same size, at most ``batch``)."""
        if self._shapes is None:
            self.check()
        return group_by_size(self._shapes, self.batch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """``{input_name: N x 3 x H x W float32 0..1}`` per batch; a new pass every time."""
        for indices in self.groups():
            yield {self.input_name: stack_batch([self.load(i) for i in indices])}

    def with_masks(self) -> Iterator[tuple[list[int], np.ndarray, list[np.ndarray] | None]]:
        """``(indices, N x 3 x H x W float32 batch, masks or None)`` per batch (masks when every image has one)."""
        use_masks = all(r.has_mask for r in self.refs)
        for indices in self.groups():
            images = [self.load(i) for i in indices]
            masks = [self.load_mask(i, im.shape[:2]) for i, im in zip(indices, images, strict=True)] if use_masks \
                else None
            yield indices, stack_batch(images), masks


# ----------------------------------------------------------------------------- which images


@dataclass(frozen=True)
class Selection:
    """The calibration images, the disjoint gate images, and how they were chosen (for the report)."""

    calibration: list[ImageRef]
    gate: list[ImageRef]
    calibration_source: dict
    gate_source: dict

    @property
    def gate_has_masks(self) -> bool:
        return all(r.has_mask for r in self.gate)


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first index 0, deterministic, distinct."""
    return [i * total // count for i in range(count)]


def folder_images(folder: str | Path) -> list[ImageRef]:
    """Image files directly in ``folder`` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files | expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return [ImageRef(p.name, p) for p in files]


def split_images(root: str | Path, split: str, class_names: Sequence[str]) -> list[ImageRef]:
    """The images of a VOC-layout split whose classes must be the model's foreground classes."""
    dataset = VOCDataset(root, split)
    if tuple(dataset.class_names) != tuple(class_names):
        raise DataError(f"{root}: classes {list(dataset.class_names)} | expected the model's "
                        f"{list(class_names)} (background excluded)")
    # VOC layout: JPEGImages/<id>.jpg (the dataset checked they exist); samples are built on
    # demand, since a split whose labels come from masks decodes a mask per sample
    return [ImageRef(image_id, dataset.root / "JPEGImages" / f"{image_id}.jpg", dataset, i)
            for i, image_id in enumerate(dataset.ids)]


def _take(pool: list[ImageRef], count: int, what: str, source: str) -> list[ImageRef]:
    if len(pool) < count:
        raise DataError(f"{source}: {len(pool)} {what} images | expected at least {count}")
    return [pool[i] for i in spread(count, len(pool))]


def select_images(*, data: str | None, images: str | None, split: str, gate_split: str, num: int, gate_num: int,
                  class_names: Sequence[str]) -> Selection:
    """Pick ``num`` calibration images and up to ``gate_num`` held-out gate images, disjoint.

    ``images`` given: calibrate on that folder; the gate uses ``data``'s ``gate_split`` (with
    masks) when ``data`` is also given, else the folder's remaining images (no masks). Only
    ``data``: calibrate on ``split``, gate on ``gate_split``; the same split is divided in two.
    ``class_names`` are the model's foreground classes.
    """
    if images:
        pool = folder_images(images)
        calibration = _take(pool, num, "calibration", str(images))
        calibration_source = {"images": str(images), "available": len(pool)}
    else:
        pool = split_images(data, split, class_names)
        calibration = _take(pool, num, "calibration", f"{data} split {split!r}")
        calibration_source = {"data": str(data), "split": split, "available": len(pool)}
    used = {r.path.resolve() for r in calibration}
    if data:
        gate_pool = split_images(data, gate_split, class_names) if not (images is None and gate_split == split) \
            else pool
        gate_source = {"data": str(data), "split": gate_split}
    else:
        gate_pool = pool
        gate_source = {"images": str(images)}
    held_out = [r for r in gate_pool if r.path.resolve() not in used]
    if not held_out:
        where = gate_source.get("split", gate_source.get("images"))
        raise DataError(f"{where}: no held-out images left for the accuracy gate after taking {len(calibration)} "
                        f"for calibration | expected more images than --num (or another gate split)")
    gate = [held_out[i] for i in spread(min(gate_num, len(held_out)), len(held_out))]
    gate_source.update(available=len(held_out))
    return Selection(calibration, gate, calibration_source, gate_source)


class OrtReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next``) over some batches, one pass."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)
