"""Convert a COCO-format export (labelme, CVAT, Roboflow: one annotations JSON beside an image
folder) into the PASCAL VOC layout that :class:`~promptseg.data.voc.VOCDataset` reads.

Written under ``out`` (the layout :func:`~promptseg.data.synth.write_world` uses):

- ``JPEGImages/<id>.jpg``: JPEGs copied byte for byte; other formats, and JPEGs with an EXIF
  orientation to bake in, re-encoded as RGB JPEG quality 95 (the reader opens only ``<id>.jpg``);
- ``SegmentationClass/<id>.png``: VOC-palette masks, 0 background, 1..C the categories in the order
  of their sorted ids, 255 (ignore) where instances of different classes overlap and on crowd regions;
- ``cls_labels.npy``: dict id -> float32[C] multi-hot (string keys): a class is present when one of
  its annotations, crowd included, covers a pixel;
- ``classes.json``: ``names`` (read by the VOC reader), ``synonyms`` (POLE's candidates: each class's
  own name only; add more there or pass ``--candidates``), the COCO category ids and the source;
- ``ImageSets/Segmentation/{train,val}.txt``: a split drawn by ``seed`` (``val.txt`` only when
  ``val_share > 0``), and ``coco_import.json``, the summary :func:`import_coco` returns.

Decisions:

- An instance's encoding does not change its meaning: a non-crowd instance given as RLE gets its
  class like a polygon one, a crowd given as polygons is ignore like a crowd RLE, and one image may
  mix them. Polygons with fewer than 3 points are dropped (tools write lines and points that way);
  an annotation left with no pixels is counted as ``skipped``.
- Orientation: labelme and Roboflow annotate the displayed (EXIF-applied) image, some exporters the
  stored bitmap. The image entry's width/height decide: the displayed size if it matches (also when
  both do), else the stored size. The chosen orientation is baked into the written JPEG, which
  carries no orientation tag, so every reader sees the pixels the mask was drawn on.

The JSON, the image files and their sizes are checked before anything is written (:func:`plan_import`),
and the tree is built in a folder beside ``out`` and renamed into place, so a failure (a truncated
image found while writing, say) never leaves a half-converted dataset.
"""

from __future__ import annotations

import io
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from ..io import read_json, write_bytes_atomic, write_json_atomic
from .images import exif_orientation, load_rgb, mask_to_png_image
from .palette import IGNORE_INDEX
from .voc import write_image_sets

JPEG_QUALITY = 95
POLYGON_TOLERANCE = 1.0  # pixels a polygon point may lie outside the image (annotation tools overshoot)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SUBDIRS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")


@dataclass(frozen=True)
class PlannedImage:
    """One image to convert: where it comes from, the VOC id it gets and how its pixels are written."""

    coco_id: int
    voc_id: str
    source: Path
    width: int  # as the annotations say; the written JPEG and mask have this size
    height: int
    exif: bool  # apply the file's EXIF orientation (annotations drawn on the displayed image)
    copy: bool  # a JPEG already as the annotations see it: copy the bytes
    annotations: tuple[dict, ...]
    split: str


@dataclass(frozen=True)
class ImportPlan:
    """A checked COCO export, ready to write: see :func:`plan_import`."""

    annotations_path: Path
    images_dir: Path
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]  # COCO id of class k + 1 at index k
    images: tuple[PlannedImage, ...]
    val_share: float
    seed: int

    @property
    def cat_to_class(self) -> dict[int, int]:
        return {cid: k + 1 for k, cid in enumerate(self.category_ids)}


# ----------------------------------------------------------------------------- checking the JSON


def _mask_api() -> Any:
    try:  # an optional dependency (the "train" extra); the device runtime never imports this module
        from pycocotools import mask
    except ImportError:
        raise DataError(
            "pycocotools is not installed | expected it to rasterise COCO polygons: pip install 'promptseg[train]'"
        ) from None
    return mask


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (tools write 640.0 as well as 640), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _entries(path: Path, data: dict, key: str, required: tuple[str, ...]) -> list[dict]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DataError(f"{path}: key {key!r} missing or not a list | expected a COCO instances file")
    for entry in entries:
        missing = [r for r in required if not isinstance(entry, dict) or r not in entry]
        if missing:
            shown = repr(entry) if len(repr(entry)) <= 200 else repr(entry)[:200] + " ..."
            raise DataError(f"{path}: {key} entry {shown} lacks {', '.join(missing)} | expected keys "
                            f"{', '.join(required)}")
    return entries


def _categories(path: Path, data: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
    categories = _entries(path, data, "categories", ("id", "name"))
    if not categories:
        raise DataError(f"{path}: no categories | expected at least one")
    if len(categories) > 254:
        raise DataError(f"{path}: {len(categories)} categories | expected at most 254 (ids must fit uint8)")
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for cat in categories:
        cid, name = _whole(cat["id"]), cat["name"]
        if cid is None:
            raise DataError(f"{path}: category id {cat['id']!r} | expected an integer")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: category {cid} has name {name!r} | expected a non-empty string")
        if cid in seen_ids:
            raise DataError(f"{path}: category id {cid} appears twice | expected unique category ids")
        if name in seen_names:
            raise DataError(f"{path}: category name {name!r} appears twice | expected unique class names")
        seen_ids.add(cid)
        seen_names.add(name)
    ordered = sorted(categories, key=lambda c: _whole(c["id"]))
    return tuple(c["name"] for c in ordered), tuple(_whole(c["id"]) for c in ordered)


def _image_entries(path: Path, data: dict) -> list[dict]:
    images = _entries(path, data, "images", ("id", "file_name", "width", "height"))
    if not images:
        raise DataError(f"{path}: no images | expected at least one")
    seen: set[int] = set()
    for info in images:
        image_id = _whole(info["id"])
        if image_id is None:
            raise DataError(f"{path}: image id {info['id']!r} | expected an integer")
        if image_id in seen:
            raise DataError(f"{path}: image id {image_id} appears twice | expected unique image ids")
        seen.add(image_id)
        if not isinstance(info["file_name"], str) or not info["file_name"].strip():
            raise DataError(f"{path}: image {image_id} has file_name {info['file_name']!r} | expected a file name")
        for key in ("width", "height"):
            value = _whole(info[key])
            if value is None or value < 1:
                raise DataError(f"{path}: image {image_id} ({info['file_name']}) has {key} {info[key]!r} | "
                                f"expected a positive integer")
    return images


def _check_polygons(path: Path, ann: dict, info: dict, polygons: list) -> list[list[float]]:
    """The polygons of ``ann`` with at least 3 points, each checked to lie on the image."""
    width, height = _whole(info["width"]), _whole(info["height"])
    where = f"{path}: annotation {ann['id']!r} (image {info['file_name']})"
    kept = []
    for polygon in polygons:
        if not isinstance(polygon, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon
        ):
            raise DataError(f"{where}: polygon {str(polygon)[:80]} | expected a list of numbers x1, y1, x2, y2, ...")
        if len(polygon) % 2:
            raise DataError(f"{where}: polygon has {len(polygon)} coordinates | expected x, y pairs (an even count)")
        xs, ys = polygon[0::2], polygon[1::2]
        for x, y in zip(xs, ys, strict=True):
            if not (-POLYGON_TOLERANCE <= x <= width + POLYGON_TOLERANCE
                    and -POLYGON_TOLERANCE <= y <= height + POLYGON_TOLERANCE):
                raise DataError(
                    f"{where}: polygon point ({x:g}, {y:g}) lies outside the {width}x{height} (WxH) image | "
                    f"expected 0..{width}, 0..{height} within {POLYGON_TOLERANCE:g} pixel"
                )
        if len(polygon) >= 6:  # 2 points or fewer enclose nothing (and pycocotools reads 4 numbers as a box)
            kept.append([float(v) for v in polygon])
    return kept


def _rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString), None if malformed."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _check_rle(path: Path, ann: dict, info: dict, rle: dict) -> dict:
    """A checked RLE in pycocotools' compressed form; its run lengths must tile the image exactly
    (older pycocotools decode past the buffer otherwise)."""
    width, height = _whole(info["width"]), _whole(info["height"])
    where = f"{path}: annotation {ann['id']!r} (image {info['file_name']})"
    size, raw = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or [_whole(v) for v in size] != [height, width]:
        raise DataError(f"{where}: RLE size {size!r} | expected [{height}, {width}] (height, width of the image)")
    if isinstance(raw, list):
        if not all(_whole(v) is not None and _whole(v) >= 0 for v in raw):
            raise DataError(f"{where}: RLE counts hold a value that is not a non-negative integer")
        counts = [_whole(v) for v in raw]
    elif isinstance(raw, (str, bytes)):
        text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else raw
        counts = _rle_string_counts(text)
        if counts is None or any(c < 0 for c in counts):
            raise DataError(f"{where}: RLE counts string is malformed | expected pycocotools' compressed form")
    else:
        raise DataError(f"{where}: RLE counts of type {type(raw).__name__} | expected a list of run lengths "
                        f"or a string")
    if sum(counts) != height * width:
        raise DataError(f"{where}: RLE run lengths sum to {sum(counts)} | expected {height * width} "
                        f"({width}x{height} pixels)")
    if isinstance(raw, list):
        return {"size": [height, width], "counts": counts}  # uncompressed: frPyObjects compresses it
    return {"size": [height, width], "counts": raw if isinstance(raw, bytes) else raw.encode("ascii")}


def _check_annotation(path: Path, ann: dict, info: dict, cat_to_class: dict[int, int]) -> dict:
    """A normalised copy of ``ann``: class, crowd flag and either ``polygons`` or ``rle``."""
    cid = _whole(ann["category_id"])
    if cid not in cat_to_class:
        raise DataError(f"{path}: annotation {ann['id']!r} has unknown category_id {ann['category_id']!r} | "
                        f"expected one of {sorted(cat_to_class)}")
    crowd = ann.get("iscrowd", 0)
    if isinstance(crowd, str) or crowd not in (0, 1):  # 0/1, also written as false/true or 0.0/1.0
        raise DataError(f"{path}: annotation {ann['id']!r} has iscrowd {crowd!r} | expected 0 or 1")
    segmentation = ann["segmentation"]
    out = {"id": ann["id"], "class": cat_to_class[cid], "crowd": bool(crowd)}
    if isinstance(segmentation, list) and segmentation and not any(isinstance(p, list) for p in segmentation):
        raise DataError(f"{path}: annotation {ann['id']!r} segmentation {str(segmentation)[:80]} is not a list of "
                        f"polygons | expected [[x1, y1, x2, y2, ...], ...]")
    if isinstance(segmentation, list):
        out["polygons"] = _check_polygons(path, ann, info, segmentation)
    elif isinstance(segmentation, dict):
        out["rle"] = _check_rle(path, ann, info, segmentation)
    else:
        raise DataError(f"{path}: annotation {ann['id']!r} segmentation of type {type(segmentation).__name__} | "
                        f"expected a list of polygons or an RLE dict")
    return out


# ----------------------------------------------------------------------------- planning


def _voc_ids(file_names: list[str]) -> list[str]:
    """File stems made safe for list files and paths, unique even on case-insensitive file systems."""
    ids, used = [], set()
    for name in file_names:
        base = _UNSAFE_ID_CHARS.sub("_", Path(name.replace("\\", "/")).stem).lstrip(".") or "image"
        voc_id, n = base, 1
        while voc_id.lower() in used:
            n += 1
            voc_id = f"{base}_{n}"
        used.add(voc_id.lower())
        ids.append(voc_id)
    return ids


def _resolve(images_dir: Path, path: Path, info: dict) -> Path:
    """The image file of an entry: its file_name under ``images_dir``, else its bare name there
    (CVAT and labelme write paths relative to their own project folder)."""
    name = info["file_name"].replace("\\", "/")
    for candidate in (images_dir / name, images_dir / Path(name).name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{images_dir / name}: image file of image {info['id']!r} listed in {path} not found")


def _orientation(source: Path, info: dict, path: Path) -> tuple[bool, bool]:
    """``(exif, copy)`` for an image file: whether its EXIF orientation applies, whether its bytes can
    be copied (a JPEG without an orientation to bake in)."""
    try:
        with Image.open(source) as img:
            stored, orientation, fmt = img.size, exif_orientation(img), img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{source}: unreadable image ({exc})") from None
    displayed = (stored[1], stored[0]) if orientation >= 5 else stored
    expected = (_whole(info["width"]), _whole(info["height"]))
    if expected == displayed:
        exif = True
    elif expected == stored:
        exif = False
    else:
        raise DataError(f"{source}: image size {displayed[0]}x{displayed[1]} (WxH) | expected "
                        f"{expected[0]}x{expected[1]} as {path} says for image {info['id']!r}")
    return exif, fmt == "JPEG" and orientation == 1


def _split(n: int, val_share: float, seed: int, path: Path) -> list[str]:
    """``train``/``val`` per image, drawn by ``seed``: round(n * val_share) val images, at least one
    of each when ``val_share > 0``."""
    if val_share == 0.0:
        return ["train"] * n
    if n < 2:
        raise DataError(f"{path}: {n} image | expected at least 2 to split into train and val (or val_share=0)")
    n_val = min(max(int(math.floor(n * val_share + 0.5)), 1), n - 1)
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ["val" if i in val else "train" for i in range(n)]


def plan_import(
    annotations: str | os.PathLike, images: str | os.PathLike, val_share: float = 0.2, seed: int = 0
) -> ImportPlan:
    """Read and check a COCO export without writing anything; every problem is a :class:`DataError`
    naming the file (or :class:`ConfigError` for a bad ``val_share``)."""
    if not (isinstance(val_share, (int, float)) and 0.0 <= val_share < 1.0):
        raise ConfigError(f"val_share: got {val_share!r} | expected a share in [0, 1)")
    path, images_dir = Path(annotations), Path(images)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is {type(data).__name__} | expected a COCO instances object")
    _mask_api()  # fail before the slow part, not half way through
    class_names, category_ids = _categories(path, data)
    cat_to_class = {cid: k + 1 for k, cid in enumerate(category_ids)}
    infos = sorted(_image_entries(path, data), key=lambda i: _whole(i["id"]))
    by_id = {_whole(i["id"]): i for i in infos}
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in by_id}
    for ann in _entries(path, data, "annotations", ("id", "image_id", "category_id", "segmentation")):
        image_id = _whole(ann["image_id"])
        if image_id not in by_id:
            raise DataError(f"{path}: annotation {ann['id']!r} refers to image_id {ann['image_id']!r} | "
                            f"expected the id of an entry of 'images'")
        per_image[image_id].append(_check_annotation(path, ann, by_id[image_id], cat_to_class))
    if any(per_image.values()) and not any(
        a.get("rle") or a.get("polygons") for anns in per_image.values() for a in anns
    ):
        raise DataError(f"{path}: no annotation has a polygon or RLE | expected segmentations (a box-only export?)")
    voc_ids = _voc_ids([i["file_name"] for i in infos])
    splits = _split(len(infos), float(val_share), seed, path)
    planned = []
    for info, voc_id, split in zip(infos, voc_ids, splits, strict=True):
        source = _resolve(images_dir, path, info)
        exif, copy = _orientation(source, info, path)
        planned.append(PlannedImage(
            coco_id=_whole(info["id"]), voc_id=voc_id, source=source, width=_whole(info["width"]),
            height=_whole(info["height"]), exif=exif, copy=copy,
            annotations=tuple(per_image[_whole(info["id"])]), split=split,
        ))
    return ImportPlan(path, images_dir, class_names, category_ids, tuple(planned), float(val_share), seed)


# ----------------------------------------------------------------------------- writing


def _region(mask_api: Any, ann: dict, height: int, width: int) -> np.ndarray:
    """``H x W`` bool pixels of one checked annotation (pycocotools' rasterisation, COCO's own)."""
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        if "rle" in ann:
            rle = ann["rle"]
            if isinstance(rle["counts"], list):
                rle = mask_api.frPyObjects(rle, height, width)
            return mask_api.decode(rle).astype(bool)
        if not ann["polygons"]:
            return np.zeros((height, width), dtype=bool)
        return mask_api.decode(mask_api.merge(mask_api.frPyObjects(ann["polygons"], height, width))).astype(bool)


def rasterise(
    plan_image: PlannedImage, num_classes: int, mask_api: Any | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(H x W uint8 mask, float32[C] labels, skipped annotations)`` of one planned image: 0 background,
    class ids where one class covers a pixel, 255 where different classes overlap or a crowd lies."""
    mask_api = mask_api or _mask_api()
    h, w = plan_image.height, plan_image.width
    owner = np.zeros((h, w), dtype=np.uint8)
    ignore = np.zeros((h, w), dtype=bool)
    labels = np.zeros(num_classes, dtype=np.float32)
    skipped = 0
    for ann in plan_image.annotations:
        region = _region(mask_api, ann, h, w)
        if not region.any():
            skipped += 1
            continue
        labels[ann["class"] - 1] = 1.0  # crowds show the class too (as the COCO reader counts them)
        if ann["crowd"]:
            ignore |= region
            continue
        ignore |= region & (owner != 0) & (owner != ann["class"])
        owner[region & (owner == 0)] = ann["class"]
    owner[ignore] = IGNORE_INDEX
    return owner, labels, skipped


def _jpeg_bytes(plan_image: PlannedImage) -> bytes:
    if plan_image.copy:
        return plan_image.source.read_bytes()
    rgb = load_rgb(plan_image.source, exif=plan_image.exif)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)  # no EXIF: the orientation is baked in
    return buf.getvalue()


def _png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mask_to_png_image(mask).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def classes_json(plan: ImportPlan) -> dict:
    """``classes.json`` of an imported dataset (keys as the synthetic world writes, where they apply)."""
    return {
        "names": list(plan.class_names),
        "synonyms": {name: [name] for name in plan.class_names},
        "coco_category_ids": dict(zip(plan.class_names, plan.category_ids, strict=True)),
        "source": {"format": "coco", "annotations": str(plan.annotations_path), "images": str(plan.images_dir),
                   "val_share": plan.val_share, "seed": plan.seed},
    }


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder | expected a new or empty output folder")


def write_import(plan: ImportPlan, out: str | os.PathLike, progress: Callable[[int], None] | None = None) -> dict:
    """Write a planned import under ``out`` (new or empty) and return its summary (also in
    ``coco_import.json``); ``progress(1)`` after each image."""
    out = Path(out)
    _check_out(out)
    mask_api = _mask_api()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir()  # beside out, so the final rename stays on one file system
    try:
        for sub in _SUBDIRS:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        labels: dict[str, np.ndarray] = {}
        splits: dict[str, list[str]] = {"train": [], "val": []}
        ignored = pixels = skipped = copied = 0
        for item in plan.images:
            mask, labels[item.voc_id], n_skipped = rasterise(item, len(plan.class_names), mask_api)
            write_bytes_atomic(staging / "JPEGImages" / f"{item.voc_id}.jpg", _jpeg_bytes(item))
            write_bytes_atomic(staging / "SegmentationClass" / f"{item.voc_id}.png", _png_bytes(mask))
            splits[item.split].append(item.voc_id)
            ignored += int(np.count_nonzero(mask == IGNORE_INDEX))
            pixels += mask.size
            skipped += n_skipped
            copied += int(item.copy)
            if progress is not None:
                progress(1)
        write_image_sets(staging, splits, labels)
        write_json_atomic(staging / "classes.json", classes_json(plan))
        summary = {
            "images": len(plan.images),
            "train": len(splits["train"]),
            "val": len(splits["val"]),
            "classes": len(plan.class_names),
            "class_names": list(plan.class_names),
            "annotations": sum(len(i.annotations) for i in plan.images),
            "crowd_annotations": sum(a["crowd"] for i in plan.images for a in i.annotations),
            "skipped": skipped,
            "ignored_pixel_share": ignored / pixels if pixels else 0.0,
            "copied_jpegs": copied,
            "converted_images": len(plan.images) - copied,
            "out": str(out),
        }
        write_json_atomic(staging / "coco_import.json", summary)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace it on every platform
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return summary


def import_coco(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    val_share: float = 0.2,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Convert a COCO export to the VOC layout under ``out`` (a new or empty folder); see the module
    docstring for the files and rules. Returns the summary: images, train, val, classes, class_names,
    annotations, crowd_annotations, skipped (annotations with no pixels), ignored_pixel_share,
    copied_jpegs, converted_images, out."""
    _check_out(Path(out))
    return write_import(plan_import(annotations, images, val_share, seed), out, progress)


# ----------------------------------------------------------------------------- command line


@click.command("import-coco")
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--images", "images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding the images; file_name entries are looked up under it.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Dataset root to write (a new or empty folder).")
@click.option("--val-share", default=0.2, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of images in the val split; 0 writes train only.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/val split.")
def import_coco_cmd(annotations: Path, images: Path, out: Path, val_share: float, seed: int) -> None:
    """Convert a COCO-format export (labelme, CVAT, Roboflow) to the PASCAL VOC layout promptseg trains on.

    ANNOTATIONS is the instances JSON; --images the folder its file_name entries live in. Writes
    JPEGImages/, SegmentationClass/ (VOC palette; 255 where different classes overlap and on crowd
    regions), cls_labels.npy, classes.json, ImageSets/Segmentation/{train,val}.txt and
    coco_import.json (the summary) to --out. Everything is checked before anything is written.
    """
    _check_out(out)
    plan = plan_import(annotations, images, val_share, seed)
    with click.progressbar(length=len(plan.images), label="import coco") as bar:
        summary = write_import(plan, out, progress=bar.update)
    click.echo(
        f"wrote {summary['images']} images ({summary['train']} train, {summary['val']} val), "
        f"{summary['classes']} classes, {summary['ignored_pixel_share']:.2%} ignored pixels, "
        f"{summary['skipped']} skipped annotations to {out}"
    )
