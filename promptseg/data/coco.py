"""COCO 2014 reader via pycocotools, with the same sample interface as the VOC reader.

Category ids in COCO are sparse (1..90 for 80 classes); promptseg uses contiguous 1-based ids in
the order of the sorted category ids so masks fit uint8 and match a C-way classifier.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, PromptsegError
from ..io import read_json
from .images import image_size, load_rgb
from .palette import IGNORE_INDEX

SPLITS = ("train", "val")


@dataclass(frozen=True, eq=False)
class COCOSample:
    """One COCO image: labels are ready, pixels and masks load on demand."""

    id: str  # file name stem, e.g. COCO_val2014_000000000042
    image_id: int
    image_path: Path
    labels: np.ndarray  # float32[C] multi-hot
    height: int
    width: int
    annotations: tuple[dict, ...] = field(repr=False)
    cat_to_class: dict[int, int] = field(repr=False)  # COCO category id -> contiguous 1-based id
    coco: Any = field(repr=False)  # pycocotools.coco.COCO, for annToMask

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[0])

    def load_image(self) -> np.ndarray:
        """``H x W x 3`` uint8 RGB."""
        return load_rgb(self.image_path)

    def load_mask(self) -> np.ndarray:
        """``H x W`` uint8 semantic ids; later annotations paint over earlier ones, crowds are 255."""
        self._check_size()
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        for ann in self.annotations:
            try:
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning, not ours
                    warnings.simplefilter("ignore", DeprecationWarning)
                    region = self.coco.annToMask(ann).astype(bool)
            except Exception as exc:  # pycocotools raises bare TypeError/KeyError on bad segmentations
                raise DataError(
                    f"{self.image_path}: annotation {ann.get('id')!r} has an unusable segmentation ({exc})"
                ) from None
            if region.shape != mask.shape:
                raise DataError(
                    f"{self.image_path}: annotation {ann.get('id')!r} mask shape {region.shape} | "
                    f"expected {mask.shape}"
                )
            mask[region] = IGNORE_INDEX if ann.get("iscrowd", 0) else self.cat_to_class[ann["category_id"]]
        return mask

    def _check_size(self) -> None:
        """The annotation's height/width must match the file, or masks and images disagree."""
        width, height = image_size(self.image_path)  # as load_rgb returns it: EXIF orientation applied
        if (width, height) != (self.width, self.height):
            raise DataError(
                f"{self.image_path}: image size {width}x{height} (WxH) | expected {self.width}x{self.height} "
                f"as the annotation file says"
            )


def _build_coco(data: dict) -> Any:
    try:  # an optional dependency (the "train" extra); the device runtime never reads COCO
        from pycocotools.coco import COCO
    except ImportError:
        raise PromptsegError(
            "pycocotools is not installed | expected it for COCO: pip install 'promptseg[train]'"
        ) from None

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _check_instances(path: Path, data: Any) -> dict:
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is {type(data).__name__} | expected a COCO instances object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: key {key!r} missing or not a list | expected a COCO instances file")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise DataError(f"{path}: key 'annotations' is not a list | expected a list of annotations")
    if not data["categories"]:
        raise DataError(f"{path}: no categories | expected at least one")
    if len(data["categories"]) > 254:
        raise DataError(f"{path}: {len(data['categories'])} categories | expected at most 254 (ids must fit uint8)")
    for key, required in (("images", ("id", "file_name", "height", "width")),
                          ("annotations", ("id", "image_id", "category_id", "segmentation")),
                          ("categories", ("id", "name"))):
        for entry in data[key]:
            if not isinstance(entry, dict) or any(r not in entry for r in required):
                raise DataError(f"{path}: {key} entry {entry!r} | expected a dict with {', '.join(required)}")
    return data


class COCODataset(Sequence):
    """A COCO split (``train`` or ``val``) as a sequence of :class:`COCOSample`, ordered by image id."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        year: str = "2014",
        skip_empty: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found | expected a COCO directory")
        if split not in SPLITS:
            raise DataError(f"{self.root}: split {split!r} | expected one of {', '.join(SPLITS)}")
        self.split, self.year = split, str(year)
        self.image_dir = self.root / f"{split}{self.year}"
        self.annotation_path = self.root / "annotations" / f"instances_{split}{self.year}.json"
        if not self.annotation_path.is_file():
            raise DataError(f"{self.annotation_path}: annotation file not found")
        data = _check_instances(self.annotation_path, read_json(self.annotation_path))
        self.coco = _build_coco(data)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names: tuple[str, ...] = tuple(str(c["name"]) for c in categories)
        self.num_classes = len(self.class_names)
        self.cat_to_class: dict[int, int] = {c["id"]: k + 1 for k, c in enumerate(categories)}
        for ann in data["annotations"]:
            if ann["category_id"] not in self.cat_to_class:
                raise DataError(
                    f"{self.annotation_path}: annotation {ann['id']!r} has category_id {ann['category_id']!r} "
                    f"| expected one of the {self.num_classes} category ids"
                )

        self._images: list[dict] = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            if skip_empty and not self.coco.imgToAnns.get(image_id):
                continue
            self._images.append(info)
        self.ids: list[str] = [Path(info["file_name"]).stem for info in self._images]
        for info in self._images:
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                raise DataError(f"{path}: image {info['id']!r} listed in {self.annotation_path} not found")

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> COCOSample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"COCODataset index must be an int, got {type(index).__name__}")
        n = len(self._images)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        info = self._images[i]
        anns = tuple(self.coco.imgToAnns.get(info["id"], ()))
        labels = np.zeros(self.num_classes, dtype=np.float32)
        for ann in anns:  # crowd regions still show the class, so they count as present
            labels[self.cat_to_class[ann["category_id"]] - 1] = 1.0
        return COCOSample(
            id=self.ids[i],
            image_id=int(info["id"]),
            image_path=self.image_dir / info["file_name"],
            labels=labels,
            height=int(info["height"]),
            width=int(info["width"]),
            annotations=anns,
            cat_to_class=self.cat_to_class,
            coco=self.coco,
        )

    def __iter__(self) -> Iterator[COCOSample]:
        for i in range(len(self._images)):
            yield self[i]

    def __repr__(self) -> str:
        return f"COCODataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"

