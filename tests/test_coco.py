"""COCO reader: sparse category ids become contiguous, masks paint in order, crowds are ignored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.data.coco import COCODataset
from promptseg.errors import DataError


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    """A rectangle polygon; pycocotools fills pixels x0 <= x < x1, y0 <= y < y1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ann(ann_id: int, image_id: int, cat: int, segm: list[list[int]], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": segm,
            "iscrowd": crowd, "area": 1.0, "bbox": [0, 0, 1, 1]}


IMAGES = [
    {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 8, "width": 10},
    {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 6, "width": 6},
    {"id": 100, "file_name": "COCO_val2014_000000000100.jpg", "height": 10, "width": 12},
]
# sparse, unsorted ids: contiguous order is person (1) -> 1, airplane (5) -> 2, boat (9) -> 3
CATEGORIES = [{"id": 5, "name": "airplane"}, {"id": 1, "name": "person"}, {"id": 9, "name": "boat"}]
ANNOTATIONS = [
    _ann(1, 42, 1, _box(1, 1, 6, 6)),  # person
    _ann(2, 42, 5, _box(4, 3, 9, 7)),  # airplane, painted over the person
    _ann(3, 42, 1, _box(0, 6, 3, 8), crowd=1),  # crowd box as a polygon -> 255
    _ann(4, 100, 9, _box(2, 2, 5, 9)),  # boat
]


def build_coco(root: Path, split: str = "val", annotations: list[dict] | None = None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(exist_ok=True)
    for info in IMAGES:
        pixels = np.full((info["height"], info["width"], 3), 128, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{split}2014" / info["file_name"])
    data = {"images": IMAGES, "categories": CATEGORIES,
            "annotations": ANNOTATIONS if annotations is None else annotations}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    return build_coco(tmp_path / "coco")


def test_classes_ids_and_labels(coco: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = COCODataset(coco, "val")
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are swallowed
    assert ds.class_names == ("person", "airplane", "boat") and ds.num_classes == 3
    assert ds.ids == [
        "COCO_val2014_000000000007", "COCO_val2014_000000000042", "COCO_val2014_000000000100"
    ]
    labels = {s.image_id: s.labels for s in ds}
    np.testing.assert_array_equal(labels[7], [0, 0, 0])
    np.testing.assert_array_equal(labels[42], [1, 1, 0])  # crowd person counts, person also non-crowd
    np.testing.assert_array_equal(labels[100], [0, 0, 1])
    assert labels[42].dtype == np.float32


def test_masks_paint_in_order_and_ignore_crowds(coco: Path) -> None:
    ds = COCODataset(coco, "val")
    sample = ds[1]
    assert sample.id == "COCO_val2014_000000000042"
    want = np.zeros((8, 10), dtype=np.uint8)
    want[1:6, 1:6] = 1
    want[3:7, 4:9] = 2
    want[6:8, 0:3] = 255
    mask = sample.load_mask()
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, want)
    assert sample.load_image().shape == (8, 10, 3)
    boat = np.zeros((10, 12), dtype=np.uint8)
    boat[2:9, 2:5] = 3
    np.testing.assert_array_equal(ds[2].load_mask(), boat)
    np.testing.assert_array_equal(ds[0].load_mask(), np.zeros((6, 6), dtype=np.uint8))


def test_skip_empty(coco: Path) -> None:
    ds = COCODataset(coco, "val", skip_empty=True)
    assert [s.image_id for s in ds] == [42, 100]


def test_missing_annotation_file(coco: Path) -> None:
    with pytest.raises(DataError, match=r"instances_train2014\.json: annotation file not found"):
        COCODataset(coco, "train")


def test_unknown_category(tmp_path: Path) -> None:
    root = build_coco(tmp_path / "c", annotations=[_ann(1, 42, 3, _box(0, 0, 2, 2))])
    with pytest.raises(DataError, match=r"instances_val2014\.json: annotation 1 has category_id 3"):
        COCODataset(root, "val")


def test_missing_image(coco: Path) -> None:
    (coco / "val2014" / "COCO_val2014_000000000100.jpg").unlink()
    with pytest.raises(DataError, match=r"COCO_val2014_000000000100\.jpg: image 100 listed in"):
        COCODataset(coco, "val")


def test_image_size_disagrees_with_annotation(coco: Path) -> None:
    Image.new("RGB", (9, 8)).save(coco / "val2014" / "COCO_val2014_000000000042.jpg")
    with pytest.raises(DataError, match=r"000000000042\.jpg: image size 9x8 \(WxH\) \| expected 10x8"):
        COCODataset(coco, "val")[1].load_mask()
