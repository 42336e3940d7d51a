"""PASCAL VOC 2012 layout reader, shared by real VOC and the synthetic world written in its layout.

Image-level labels come from whichever source the layout has (``cls_labels.npy`` in SemPLeS or
CLIMS key form, ``Annotations/*.xml``, or the masks themselves), so the same code trains on all
of them. Every bad input raises :class:`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_write, read_json, write_text_atomic
from .images import image_size, load_mask, load_rgb
from .palette import IGNORE_INDEX

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

LABEL_SOURCES = ("auto", "cls_labels", "xml", "masks")
_MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")
_LIST_DIR = Path("ImageSets") / "Segmentation"


# ----------------------------------------------------------------------------- samples


def _checked_ids(path: Path, image_path: Path, num_classes: int, what: str) -> np.ndarray:
    """Load an id mask and check its ids and size against the image, so bad files fail loudly."""
    ids = load_mask(path)
    counts = np.bincount(ids.reshape(-1), minlength=256)
    bad = [i for i in np.flatnonzero(counts).tolist() if i > num_classes and i != IGNORE_INDEX]
    if bad:
        raise DataError(
            f"{path}: {what} ids {bad} out of range | expected 0..{num_classes} or {IGNORE_INDEX}"
        )
    width, height = image_size(image_path)  # as load_rgb returns it (EXIF orientation applied)
    if ids.shape != (height, width):
        raise DataError(
            f"{path}: {what} size {ids.shape[1]}x{ids.shape[0]} (WxH) differs from image "
            f"{image_path} size {width}x{height} | expected the same size"
        )
    return ids


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot float32[C] of the foreground ids 1..C present in ``mask``."""
    counts = np.bincount(mask.reshape(-1), minlength=256)[1 : num_classes + 1]
    return (counts > 0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Sample:
    """One image with its labels and (optional) mask and context files; pixels load on demand."""

    id: str
    image_path: Path
    labels: np.ndarray  # float32[C] multi-hot
    mask_path: Path | None
    context_path: Path | None

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[0])

    def load_image(self) -> np.ndarray:
        """``H x W x 3`` uint8 RGB."""
        return load_rgb(self.image_path)

    def load_mask(self) -> np.ndarray:
        """``H x W`` uint8 class ids (0 background, 1..C, 255 ignore), checked against the image."""
        if self.mask_path is None:
            raise DataError(f"{self.image_path}: sample {self.id!r} has no segmentation mask | expected one")
        return _checked_ids(self.mask_path, self.image_path, self.num_classes, "mask")

    def load_context(self) -> np.ndarray:
        """``H x W`` uint8: k where class k's context is painted, 0 none (synthetic worlds only)."""
        if self.context_path is None:
            raise DataError(
                f"{self.image_path}: sample {self.id!r} has no context mask | expected ContextMasks/{self.id}.png"
            )
        return _checked_ids(self.context_path, self.image_path, self.num_classes, "context")


# ----------------------------------------------------------------------------- cls_labels.npy


def _normalise_key(key: object) -> str:
    """CLIMS stores ``2007_000032`` as the int ``2007000032``; turn it back into the file id."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        text = str(int(key))
        return f"{text[:4]}_{text[4:]}" if len(text) >= 10 else text
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8")
    raise DataError(f"key {key!r} of type {type(key).__name__} | expected str or int image id")


def load_cls_labels(path: str | os.PathLike, num_classes: int) -> dict[str, np.ndarray]:
    """Read ``cls_labels.npy`` (dict id -> float32[C]) in either key form, keyed by file id."""
    path = Path(path)
    try:
        raw = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    obj = raw.item() if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0 else raw
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds {type(obj).__name__} | expected a dict image id -> float32[{num_classes}]")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        try:
            image_id = _normalise_key(key)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if vec.shape[0] != num_classes:
            raise DataError(
                f"{path}: key {key!r} has a label vector of length {vec.shape[0]} | expected length {num_classes}"
            )
        if image_id in out and not np.array_equal(out[image_id], vec):
            raise DataError(f"{path}: id {image_id!r} appears twice with different labels | expected one entry")
        out[image_id] = vec
    return out


def write_image_sets(root: str | os.PathLike, splits: dict[str, list[str]], labels: dict[str, np.ndarray]) -> None:
    """The VOC layout's lists (``ImageSets/Segmentation/<split>.txt`` for each non-empty split) and
    ``cls_labels.npy``: what a writer of the layout (the synthetic world, a COCO import) leaves behind."""
    root = Path(root)
    for split, ids in splits.items():
        if ids:
            write_text_atomic(root / _LIST_DIR / f"{split}.txt", "\n".join(ids) + "\n")
    save_cls_labels(root / "cls_labels.npy", labels)


def save_cls_labels(path: str | os.PathLike, labels: dict[str, np.ndarray]) -> None:
    """Write the SemPLeS (string key) form atomically, so a crash never leaves half a file."""
    data: dict[str, np.ndarray] = {}
    for key, value in labels.items():
        if not isinstance(key, str):
            raise DataError(f"{path}: key {key!r} | expected a str image id")
        data[key] = np.asarray(value, dtype=np.float32).reshape(-1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle, so np.save does not append ".npy" to the temp name
            np.save(fh, data, allow_pickle=True)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- helpers


def read_id_list(path: Path) -> list[str]:
    """Ids from a list file: first token per line, blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: list file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable list file ({exc})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: list file has no ids | expected one image id per line")
    return ids


def xml_labels(path: Path, class_index: dict[str, int]) -> np.ndarray:
    """Multi-hot labels from a VOC XML; difficult objects count too, as in CLIMS's label making."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: not valid VOC XML ({exc})") from None
    labels = np.zeros(len(class_index), dtype=np.float32)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise DataError(
                f"{path}: object class {name!r} unknown | expected one of {', '.join(class_index)}"
            )
        labels[class_index[name]] = 1.0
    return labels


def _class_names_from(root: Path) -> tuple[str, ...]:
    path = root / "classes.json"
    if not path.is_file():
        return VOC_CLASSES
    meta = read_json(path)
    names = meta.get("names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'names' is {names!r} | expected a non-empty list of class-name strings")
    return tuple(names)


# ----------------------------------------------------------------------------- dataset


class VOCDataset(Sequence):
    """A split of a VOC-layout tree as a sequence of :class:`Sample`.

    Labels from ``cls_labels.npy`` and XML are read up front (so bad files fail at construction);
    labels derived from masks are computed on first access and cached, since that decodes masks.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        list_file: str | os.PathLike | None = None,
        mask_dir: str | None = None,
        labels: str = "auto",
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found | expected a VOC-layout directory")
        self.split = split
        self.class_names: tuple[str, ...] = (
            tuple(class_names) if class_names is not None else _class_names_from(self.root)
        )
        self.num_classes = len(self.class_names)
        if not 1 <= self.num_classes <= 254:
            raise DataError(f"{self.root}: {self.num_classes} classes | expected 1..254 (ids must fit uint8)")
        self.list_path = self._list_path(list_file)
        self.ids: list[str] = read_id_list(self.list_path)
        self._image_paths = [self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        for image_id, path in zip(self.ids, self._image_paths, strict=True):
            if not path.is_file():
                raise DataError(f"{path}: image of id {image_id!r} listed in {self.list_path} not found")
        self._mask_paths = self._find_masks(mask_dir)
        context_dir = self.root / "ContextMasks"
        self._context_paths: list[Path | None] = [
            (context_dir / f"{i}.png") if (context_dir / f"{i}.png").is_file() else None for i in self.ids
        ]
        self.label_source = self._label_source(labels)
        self._labels: list[np.ndarray | None] = self._read_labels()

    @property
    def has_masks(self) -> bool:
        """Whether every image of the split has a mask (a classification-only split has none)."""
        return all(path is not None for path in self._mask_paths)

    # -- construction helpers

    def _list_path(self, list_file: str | os.PathLike | None) -> Path:
        if list_file is not None:
            path = Path(list_file)
            if not path.is_absolute() and not path.exists():
                path = self.root / path
            if not path.is_file():
                raise DataError(f"{path}: list file not found")
            return path
        path = self.root / _LIST_DIR / f"{self.split}.txt"
        if not path.is_file():
            found = sorted(p.stem for p in (self.root / _LIST_DIR).glob("*.txt"))
            raise DataError(
                f"{path}: split {self.split!r} not found | "
                f"expected one of: {', '.join(found) or 'none (no list files there)'}"
            )
        return path

    def _find_masks(self, mask_dir: str | None) -> list[Path | None]:
        """Per-id mask file; auto mode prefers SegmentationClass and falls back to ...Aug per id."""
        if mask_dir is not None:
            folder = self.root / mask_dir
            if not folder.is_dir():
                raise DataError(f"{folder}: mask directory not found")
            paths: list[Path | None] = []
            for image_id in self.ids:
                path = folder / f"{image_id}.png"
                if not path.is_file():
                    raise DataError(f"{path}: mask of id {image_id!r} listed in {self.list_path} not found")
                paths.append(path)
            return paths
        folders = [self.root / d for d in _MASK_DIRS if (self.root / d).is_dir()]
        paths = []
        for image_id in self.ids:
            found = next((f / f"{image_id}.png" for f in folders if (f / f"{image_id}.png").is_file()), None)
            paths.append(found)
        return paths

    def _label_source(self, labels: str) -> str:
        if labels not in LABEL_SOURCES:
            raise DataError(f"{self.root}: labels={labels!r} | expected one of {', '.join(LABEL_SOURCES)}")
        if labels != "auto":
            return labels
        if (self.root / "cls_labels.npy").is_file():
            return "cls_labels"
        if (self.root / "Annotations").is_dir():
            return "xml"
        return "masks"

    def _read_labels(self) -> list[np.ndarray | None]:
        if self.label_source == "cls_labels":
            path = self.root / "cls_labels.npy"
            table = load_cls_labels(path, self.num_classes)
            missing = [i for i in self.ids if i not in table]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise DataError(
                    f"{path}: no labels for {len(missing)} listed id(s): {shown} | "
                    f"expected every id of {self.list_path}"
                )
            return [table[i] for i in self.ids]
        if self.label_source == "xml":
            index = {name: k for k, name in enumerate(self.class_names)}
            return [xml_labels(self.root / "Annotations" / f"{i}.xml", index) for i in self.ids]
        for image_id, path in zip(self.ids, self._mask_paths, strict=True):
            if path is None:
                raise DataError(
                    f"{self.root}: id {image_id!r} has no mask to derive labels from | expected "
                    f"{' or '.join(_MASK_DIRS)}/{image_id}.png, cls_labels.npy or Annotations/"
                )
        return [None] * len(self.ids)

    # -- sequence protocol

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"VOCDataset index must be an int, got {type(index).__name__}")
        n = len(self.ids)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        labels = self._labels[i]
        if labels is None:
            mask_path = self._mask_paths[i]
            if mask_path is None:  # unreachable: _read_labels checked every id has a mask
                raise DataError(f"{self.root}: id {self.ids[i]!r} has no mask to derive labels from")
            ids = _checked_ids(mask_path, self._image_paths[i], self.num_classes, "mask")
            labels = self._labels[i] = labels_from_mask(ids, self.num_classes)
        sample_labels = labels.copy()  # callers may edit their copy without touching the cache
        return Sample(self.ids[i], self._image_paths[i], sample_labels, self._mask_paths[i], self._context_paths[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.ids)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, labels={self.label_source!r})"
        )
