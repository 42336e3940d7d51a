"""COCO export -> VOC layout: masks match a direct rasterisation, the VOC reader reads the result,
and every bad input is a DataError that names the problem."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from promptseg.data.coco_import import import_coco, import_coco_cmd, plan_import
from promptseg.data.images import load_mask
from promptseg.data.palette import IGNORE_INDEX
from promptseg.data.voc import VOCDataset, load_cls_labels
from promptseg.errors import ConfigError, DataError

pycocotools_mask = pytest.importorskip("pycocotools.mask")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2

# Sparse, unsorted COCO category ids: classes are 1..C in the order of the sorted ids.
CATEGORIES = [{"id": 7, "name": "person"}, {"id": 3, "name": "car"}, {"id": 12, "name": "dog"}]
CLASS_OF = {3: 1, 7: 2, 12: 3}
NAMES = ["car", "person", "dog"]


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rect_region(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The pixels a COCO rectangle with integer corners covers: columns x0..x1-1, rows y0..y1-1."""
    region = np.zeros((h, w), dtype=bool)
    region[y0:y1, x0:x1] = True
    return region


def _rle_counts(region: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE written by hand: runs over the column-major pixels, zeros first."""
    counts, current, run = [], 0, 0
    for value in region.T.reshape(-1).astype(int).tolist():
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def _expected_mask(h: int, w: int, instances: list[tuple[int, bool, np.ndarray]]) -> np.ndarray:
    """Class id where exactly one class covers a pixel, 255 where two classes do or a crowd lies."""
    cover = np.zeros((len(NAMES) + 1, h, w), dtype=bool)
    crowd = np.zeros((h, w), dtype=bool)
    for cls, is_crowd, region in instances:
        if is_crowd:
            crowd |= region
        else:
            cover[cls] |= region
    n_classes = cover.sum(axis=0)
    mask = np.argmax(cover, axis=0).astype(np.uint8)
    mask[(n_classes >= 2) | crowd] = IGNORE_INDEX
    return mask


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth ramps (JPEG keeps them close, unlike noise), different per ``seed``."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full((h, w), 40 * seed)], axis=2).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def make_export(root: Path) -> tuple[Path, Path, dict[str, np.ndarray], dict]:
    """A small COCO export under ``root``: (annotations path, image folder, expected masks by VOC id, JSON)."""
    images = root / "export" / "images"
    (images / "nested").mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}

    # 1: street.jpg (40x30 JPEG): car and person overlap; a second car overlaps the first (same class)
    Image.fromarray(_picture(30, 40, 1)).save(images / "street.jpg", quality=90)
    h, w = 30, 40
    car1, person, car2 = _rect_region(h, w, 2, 2, 20, 16), _rect_region(h, w, 15, 10, 30, 25), \
        _rect_region(h, w, 12, 12, 18, 28)
    expected["street"] = _expected_mask(h, w, [(1, False, car1), (2, False, person), (1, False, car2)])
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [_rect(2, 2, 20, 16)], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": [_rect(15, 10, 30, 25)], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [_rect(12, 12, 18, 28)], "iscrowd": 0},
    ]

    # 2: park.png (32x24 RGBA PNG): a dog triangle, a crowd of people as uncompressed RLE, a crowd of
    # cars as compressed RLE, a degenerate 2-point polygon and an empty segmentation (both skipped)
    h, w = 24, 32
    rgba = np.dstack([_picture(h, w, 2), np.full((h, w), 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(images / "park.png")
    triangle = [1.5, 20.0, 16.0, 2.5, 30.5, 20.0]
    dog = pycocotools_mask.decode(pycocotools_mask.merge(pycocotools_mask.frPyObjects([triangle], h, w))) > 0
    crowd_people = _rect_region(h, w, 20, 14, 32, 24)
    crowd_cars = np.zeros((h, w), dtype=bool)
    crowd_cars[0:3, 0:5] = True
    compressed = pycocotools_mask.encode(np.asfortranarray(crowd_cars.astype(np.uint8)))["counts"].decode("ascii")
    expected["park"] = _expected_mask(h, w, [(3, False, dog), (2, True, crowd_people), (1, True, crowd_cars)])
    anns += [
        {"id": 10, "image_id": 2, "category_id": 12, "segmentation": [triangle], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 7, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": _rle_counts(crowd_people)}},
        {"id": 12, "image_id": 2, "category_id": 3, "iscrowd": True,  # some tools write a JSON bool
         "segmentation": {"size": [h, w], "counts": compressed}},
        {"id": 13, "image_id": 2, "category_id": 3, "segmentation": [[1, 1, 5, 5]], "iscrowd": 0},
        {"id": 14, "image_id": 2, "category_id": 7, "segmentation": [], "iscrowd": 0},
    ]

    # 3: nested/empty.jpg, listed as a path under the folder: no annotations at all (all background)
    Image.fromarray(_picture(16, 16, 3)).save(images / "nested" / "empty.jpg")
    expected["empty"] = np.zeros((16, 16), dtype=np.uint8)

    # 4: another "street" (clashing stem, a grey PNG): a non-crowd RLE car mixed with a polygon person
    h, w = 20, 20
    Image.fromarray(_picture(h, w, 4)[:, :, 0], mode="L").save(images / "street.png")
    rle_car, poly_person = _rect_region(h, w, 0, 0, 10, 10), _rect_region(h, w, 8, 8, 18, 18)
    expected["street_2"] = _expected_mask(h, w, [(1, False, rle_car), (2, False, poly_person)])
    anns += [
        {"id": 20, "image_id": 4, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": _rle_counts(rle_car)}},
        {"id": 21, "image_id": 4, "category_id": 7, "segmentation": [_rect(8, 8, 18, 18)]},  # no iscrowd: 0
    ]

    # 5: "my photo (1).jpg": an unsafe file name; one dog drawn as two polygons (a split instance)
    h, w = 18, 24
    Image.fromarray(_picture(h, w, 5)).save(images / "my photo (1).jpg")
    dog_parts = _rect_region(h, w, 0, 0, 6, 6) | _rect_region(h, w, 18, 12, 24, 18)
    expected["my_photo_1_"] = _expected_mask(h, w, [(3, False, dog_parts)])
    anns.append({"id": 30, "image_id": 5, "category_id": 12, "iscrowd": 0,
                 "segmentation": [_rect(0, 0, 6, 6), _rect(18, 12, 24, 18)]})

    data = {
        "info": {"description": "test export"},
        "images": [
            {"id": 4, "file_name": "street.png", "width": 20, "height": 20},
            {"id": 1, "file_name": "street.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "park.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "nested/empty.jpg", "width": 16, "height": 16},
            {"id": 5, "file_name": "my photo (1).jpg", "width": 24, "height": 18},
        ],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    path = root / "export" / "instances.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, images, expected, data


EXPECTED_LABELS = {  # car, person, dog; crowd classes count as present, skipped annotations do not
    "street": [1, 1, 0], "park": [1, 1, 1], "empty": [0, 0, 0], "street_2": [1, 1, 0], "my_photo_1_": [0, 0, 1],
}


@pytest.fixture
def export(tmp_path: Path):
    return make_export(tmp_path)


# ----------------------------------------------------------------------------- a good export


def test_import_writes_the_voc_layout(tmp_path: Path, export):
    annotations, images, expected, _ = export
    out = tmp_path / "voc"
    summary = import_coco(annotations, images, out, val_share=0.4, seed=0)

    for voc_id, mask in expected.items():
        np.testing.assert_array_equal(load_mask(out / "SegmentationClass" / f"{voc_id}.png"), mask, err_msg=voc_id)
        with Image.open(out / "SegmentationClass" / f"{voc_id}.png") as img:
            assert img.mode == "P"
    assert (expected["street"][10:16, 15:20] == IGNORE_INDEX).all()  # car and person overlap
    assert (expected["street"][16:25, 15:18] == IGNORE_INDEX).all()  # second car and person overlap
    assert (expected["street"][12:16, 12:15] == 1).all()  # the two cars overlap: same class stays car
    assert (expected["street"][25:28, 12:18] == 1).all() and (expected["street"][2:10, 2:15] == 1).all()
    assert (expected["park"][14:24, 20:32] == IGNORE_INDEX).all()  # the person crowd
    assert (expected["park"][0:3, 0:5] == IGNORE_INDEX).all()  # the car crowd

    labels = load_cls_labels(out / "cls_labels.npy", 3)
    assert set(labels) == set(EXPECTED_LABELS)
    for voc_id, vec in EXPECTED_LABELS.items():
        np.testing.assert_array_equal(labels[voc_id], np.array(vec, dtype=np.float32), err_msg=voc_id)

    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    assert classes["names"] == NAMES
    assert classes["synonyms"] == {name: [name] for name in NAMES}
    assert classes["coco_category_ids"] == {"car": 3, "person": 7, "dog": 12}

    train = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (out / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == 3 and len(val) == 2 and sorted(train + val) == sorted(expected)

    total = sum(m.size for m in expected.values())
    ignored = sum(int((m == IGNORE_INDEX).sum()) for m in expected.values())
    assert summary["images"] == 5 and summary["train"] == 3 and summary["val"] == 2
    assert summary["classes"] == 3 and summary["class_names"] == NAMES
    assert summary["skipped"] == 2  # the 2-point polygon and the empty segmentation
    assert summary["ignored_pixel_share"] == pytest.approx(ignored / total)
    assert json.loads((out / "coco_import.json").read_text(encoding="utf-8")) == summary
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_voc_reader_reads_both_splits(tmp_path: Path, export):
    annotations, images, expected, _ = export
    out = tmp_path / "voc"
    import_coco(annotations, images, out, val_share=0.4, seed=0)
    seen = []
    for split, n in (("train", 3), ("val", 2)):
        dataset = VOCDataset(out, split)
        assert len(dataset) == n and dataset.class_names == tuple(NAMES) and dataset.label_source == "cls_labels"
        for sample in dataset:
            np.testing.assert_array_equal(sample.load_mask(), expected[sample.id])
            np.testing.assert_array_equal(sample.labels, np.array(EXPECTED_LABELS[sample.id], dtype=np.float32))
            assert sample.load_image().shape == (*expected[sample.id].shape, 3)
            seen.append(sample.id)
    assert sorted(seen) == sorted(expected)


def test_jpegs_are_copied_and_other_formats_converted(tmp_path: Path, export):
    annotations, images, _, _ = export
    out = tmp_path / "voc"
    summary = import_coco(annotations, images, out, val_share=0.4)
    assert (out / "JPEGImages" / "street.jpg").read_bytes() == (images / "street.jpg").read_bytes()
    assert (out / "JPEGImages" / "empty.jpg").read_bytes() == (images / "nested" / "empty.jpg").read_bytes()
    for voc_id, source in (("park", "park.png"), ("street_2", "street.png")):
        with Image.open(out / "JPEGImages" / f"{voc_id}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            written = np.asarray(img, dtype=np.int16)
        with Image.open(images / source) as img:
            original = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert np.abs(written - original).mean() < 8  # JPEG quality 95 of the same pixels
    assert summary["copied_jpegs"] == 3 and summary["converted_images"] == 2


def test_split_is_deterministic_by_seed(tmp_path: Path, export):
    annotations, images, _, _ = export

    def val_ids(seed: int, name: str) -> list[str]:
        out = tmp_path / name
        import_coco(annotations, images, out, val_share=0.4, seed=seed)
        return (out / "ImageSets" / "Segmentation" / "val.txt").read_text().split()

    first = val_ids(0, "a")
    assert val_ids(0, "b") == first
    assert any(val_ids(seed, f"s{seed}") != first for seed in range(1, 6))


def test_val_share_zero_writes_train_only(tmp_path: Path, export):
    annotations, images, _, _ = export
    out = tmp_path / "voc"
    summary = import_coco(annotations, images, out, val_share=0.0)
    assert summary["train"] == 5 and summary["val"] == 0
    assert not (out / "ImageSets" / "Segmentation" / "val.txt").exists()
    assert len(VOCDataset(out, "train")) == 5


# ----------------------------------------------------------------------------- EXIF orientation


def _sideways_export(tmp_path: Path, width: int, height: int) -> tuple[Path, Path]:
    """A 40x20 JPEG bitmap tagged "turn 90 degrees clockwise", annotated as ``width x height``."""
    images = tmp_path / "images"
    images.mkdir()
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (250, 10, 10)  # left half red: on top once turned
    Image.fromarray(stored).save(images / "phone.jpg", quality=95, exif=_exif(6))
    data = {"images": [{"id": 1, "file_name": "phone.jpg", "width": width, "height": height}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(0, 0, 10, 10)]}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, images


def test_displayed_orientation_is_baked_into_the_jpeg(tmp_path: Path):
    annotations, images = _sideways_export(tmp_path, width=20, height=40)  # labelme/Roboflow: displayed size
    out = tmp_path / "voc"
    summary = import_coco(annotations, images, out, val_share=0.0)
    with Image.open(out / "JPEGImages" / "phone.jpg") as img:
        assert img.size == (20, 40)
        assert img.getexif().get(0x0112, 1) == 1  # no orientation left for a reader to apply again
        pixels = np.asarray(img.convert("RGB"))
    assert pixels[:15, :, 0].min() > 200  # the red half is on top, as a viewer shows it
    assert load_mask(out / "SegmentationClass" / "phone.png").shape == (40, 20)
    assert summary["converted_images"] == 1


def test_stored_orientation_is_kept_when_the_annotations_say_so(tmp_path: Path):
    annotations, images = _sideways_export(tmp_path, width=40, height=20)  # the exporter used the bitmap
    out = tmp_path / "voc"
    import_coco(annotations, images, out, val_share=0.0)
    with Image.open(out / "JPEGImages" / "phone.jpg") as img:
        assert img.size == (40, 20) and img.getexif().get(0x0112, 1) == 1
        assert np.asarray(img.convert("RGB"))[:, :15, 0].min() > 200  # red stays on the left
    sample = VOCDataset(out, "train")[0]
    assert sample.load_image().shape[:2] == sample.load_mask().shape == (20, 40)


def test_a_size_matching_neither_orientation_is_refused(tmp_path: Path):
    annotations, images = _sideways_export(tmp_path, width=30, height=40)
    with pytest.raises(DataError, match=r"phone\.jpg: image size 20x40 \(WxH\) \| expected 30x40"):
        import_coco(annotations, images, tmp_path / "voc", val_share=0.0)


# ----------------------------------------------------------------------------- bad input


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _unknown_category(data):
    _ann(data, 2)["category_id"] = 99


def _point_outside(data):
    _ann(data, 1)["segmentation"] = [[2, 2, 45.5, 3, 20, 16]]  # image 1 is 40 wide


def _odd_polygon(data):
    _ann(data, 1)["segmentation"] = [[2, 2, 20, 2, 20, 16, 2]]


def _text_in_polygon(data):
    _ann(data, 1)["segmentation"] = [[2, 2, "x", 2, 20, 16]]


def _flat_polygon(data):
    _ann(data, 1)["segmentation"] = [2, 2, 20, 2, 20, 16]


def _rle_wrong_size(data):
    _ann(data, 11)["segmentation"]["size"] = [23, 32]


def _rle_wrong_sum(data):
    _ann(data, 11)["segmentation"]["counts"][-1] += 5


def _rle_bad_string(data):
    _ann(data, 12)["segmentation"]["counts"] = "0 ~~"


def _rle_no_counts(data):
    del _ann(data, 12)["segmentation"]["counts"]


def _bad_crowd_flag(data):
    _ann(data, 1)["iscrowd"] = 2


def _unknown_image(data):
    _ann(data, 1)["image_id"] = 77


def _missing_images_key(data):
    del data["images"]


def _missing_width(data):
    del data["images"][1]["width"]


def _missing_category_id(data):
    del _ann(data, 3)["category_id"]


def _duplicate_name(data):
    data["categories"].append({"id": 40, "name": "car"})


def _duplicate_image_id(data):
    data["images"][0]["id"] = 1


def _no_categories(data):
    data["categories"] = []


def _boxes_only(data):
    for ann in data["annotations"]:
        ann["segmentation"] = []


def _missing_file(data):
    data["images"][1]["file_name"] = "nowhere.jpg"


def _wrong_size(data):
    data["images"][1]["width"] = 41


def _negative_height(data):
    data["images"][1]["height"] = -3


BAD_EXPORTS = [
    (_unknown_category, r"annotation 2 has unknown category_id 99 \| expected one of \[3, 7, 12\]"),
    (_point_outside, r"annotation 1 \(image street\.jpg\): polygon point \(45\.5, 3\) lies outside the 40x30 "),
    (_odd_polygon, r"annotation 1 \(image street\.jpg\): polygon has 7 coordinates"),
    (_text_in_polygon, r"annotation 1 \(image street\.jpg\): polygon \[2, 2, 'x'"),
    (_flat_polygon, r"annotation 1 segmentation \[2, 2, 20, 2, 20, 16\] is not a list of polygons"),
    (_rle_wrong_size, r"annotation 11 \(image park\.png\): RLE size \[23, 32\] \| expected \[24, 32\]"),
    (_rle_wrong_sum, r"annotation 11 \(image park\.png\): RLE run lengths sum to 773 \| expected 768"),
    (_rle_bad_string, r"annotation 12 \(image park\.png\): RLE counts string is malformed"),
    (_rle_no_counts, r"annotation 12 \(image park\.png\): RLE counts of type NoneType"),
    (_bad_crowd_flag, r"annotation 1 has iscrowd 2 \| expected 0 or 1"),
    (_unknown_image, r"annotation 1 refers to image_id 77 \| expected the id of an entry of 'images'"),
    (_missing_images_key, r"key 'images' missing or not a list"),
    (_missing_width, r"images entry .*'street\.jpg'.* lacks width"),
    (_missing_category_id, r"annotations entry .* lacks category_id"),
    (_duplicate_name, r"category name 'car' appears twice"),
    (_duplicate_image_id, r"image id 1 appears twice"),
    (_no_categories, r"no categories \| expected at least one"),
    (_boxes_only, r"no annotation has a polygon or RLE"),
    (_missing_file, r"nowhere\.jpg: image file of image 1 listed in .*instances\.json not found"),
    (_wrong_size, r"street\.jpg: image size 40x30 \(WxH\) \| expected 41x30"),
    (_negative_height, r"image 1 \(street\.jpg\) has height -3 \| expected a positive integer"),
]


@pytest.mark.parametrize("mutate, pattern", BAD_EXPORTS, ids=[m.__name__.strip("_") for m, _ in BAD_EXPORTS])
def test_bad_exports_raise_data_error_and_write_nothing(tmp_path: Path, export, mutate, pattern):
    annotations, images, _, data = export
    data = copy.deepcopy(data)
    mutate(data)
    annotations.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "voc"
    with pytest.raises(DataError, match=pattern):
        import_coco(annotations, images, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_top_level_that_is_not_an_object_is_refused(tmp_path: Path, export):
    annotations, images, _, _ = export
    annotations.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError, match=r"instances\.json: top level is list \| expected a COCO instances object"):
        import_coco(annotations, images, tmp_path / "voc")


def test_malformed_json_is_refused(tmp_path: Path, export):
    annotations, images, _, _ = export
    annotations.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"instances\.json: not valid JSON"):
        import_coco(annotations, images, tmp_path / "voc")


def test_points_within_one_pixel_of_the_border_are_accepted(tmp_path: Path, export):
    annotations, images, _, data = export
    _ann(data, 1)["segmentation"] = [[-0.9, -1.0, 40.9, -0.5, 41.0, 31.0, -1.0, 30.8]]  # image 1 is 40x30
    annotations.write_text(json.dumps(data), encoding="utf-8")
    import_coco(annotations, images, tmp_path / "voc")
    mask = load_mask(tmp_path / "voc" / "SegmentationClass" / "street.png")
    assert ((mask == 1) | (mask == IGNORE_INDEX)).all()  # the car covers the whole image


def test_one_image_cannot_be_split(tmp_path: Path):
    annotations, images = _sideways_export(tmp_path, width=20, height=40)
    with pytest.raises(DataError, match=r"1 image \| expected at least 2 to split into train and val"):
        import_coco(annotations, images, tmp_path / "voc", val_share=0.2)


@pytest.mark.parametrize("share", [1.0, -0.1, 1.5])
def test_val_share_outside_zero_to_one_is_a_config_error(tmp_path: Path, export, share):
    annotations, images, _, _ = export
    with pytest.raises(ConfigError, match=r"val_share: got .* \| expected a share in \[0, 1\)"):
        import_coco(annotations, images, tmp_path / "voc", val_share=share)


def test_a_non_empty_output_folder_is_refused(tmp_path: Path, export):
    annotations, images, _, _ = export
    out = tmp_path / "voc"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"voc: exists and is not an empty folder"):
        import_coco(annotations, images, out)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert import_coco(annotations, images, out)["images"] == 5  # an empty folder is fine


def test_missing_pycocotools_is_a_clear_error(tmp_path: Path, export, monkeypatch):
    annotations, images, _, _ = export
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes `from pycocotools import mask` fail
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(DataError, match=r"pycocotools is not installed \| expected it to rasterise COCO polygons"):
        plan_import(annotations, images)


# ----------------------------------------------------------------------------- command


def test_command_converts_and_prints_a_summary(tmp_path: Path, export):
    annotations, images, expected, _ = export
    out = tmp_path / "voc"
    result = CliRunner().invoke(import_coco_cmd, [str(annotations), "--images", str(images), "--out", str(out),
                                                  "--val-share", "0.4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 images (3 train, 2 val), 3 classes" in result.output
    assert "2 skipped annotations" in result.output
    assert len(VOCDataset(out, "val")) == 2
    assert sorted(VOCDataset(out, "train").ids + VOCDataset(out, "val").ids) == sorted(expected)


def test_command_help_and_bad_options(tmp_path: Path, export):
    annotations, images, _, _ = export
    runner = CliRunner()
    help_text = runner.invoke(import_coco_cmd, ["--help"]).output
    assert "COCO-format export" in help_text and "--val-share" in help_text and "--images" in help_text
    bad_share = runner.invoke(import_coco_cmd, [str(annotations), "--images", str(images), "--out",
                                                str(tmp_path / "voc"), "--val-share", "1.5"])
    assert bad_share.exit_code == 2 and "--val-share" in bad_share.output
    no_images = runner.invoke(import_coco_cmd, [str(annotations), "--out", str(tmp_path / "voc")])
    assert no_images.exit_code == 2 and "--images" in no_images.output


def test_command_passes_data_errors_to_the_cli_group(tmp_path: Path, export):
    """The group turns a PromptsegError into `Error: ...` and exit 1; the command itself lets it through."""
    annotations, images, _, data = export
    _ann(data, 2)["category_id"] = 99
    annotations.write_text(json.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(import_coco_cmd, [str(annotations), "--images", str(images),
                                                  "--out", str(tmp_path / "voc")])
    assert isinstance(result.exception, DataError)
    assert "unknown category_id 99" in str(result.exception)


def _labelme_style_export(root: Path, count: int = 24) -> tuple[Path, Path]:
    """An annotation tool's export: one annotations.json beside a folder of 64 px JPEGs, each with one or
    two objects drawn as polygons on a smooth background."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(count):
        picture = _picture(64, 64, i % 6)
        for k, category in enumerate(rng.choice([3, 7, 12], size=1 + i % 2, replace=False).tolist()):
            x0, y0 = int(rng.integers(0, 28)), int(rng.integers(0, 28))
            x1, y1 = x0 + int(rng.integers(12, 34)), y0 + int(rng.integers(12, 34))
            picture[y0:y1, x0:x1] = (60 * CLASS_OF[category], 200 - 50 * CLASS_OF[category], 30 * k)
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                        "category_id": category, "segmentation": [_rect(x0, y0, x1, y1)]})
        Image.fromarray(picture).save(images / f"img_{i:02d}.jpg", quality=95)
        data["images"].append({"id": i + 1, "file_name": f"img_{i:02d}.jpg", "width": 64, "height": 64})
    (root / "annotations.json").write_text(json.dumps(data))
    return root / "annotations.json", images


def test_an_annotation_tools_export_trains_through_the_pipeline(tmp_path: Path, tiny_clip):
    """The chain on a user's COCO export: import-coco, then ``promptseg pipeline`` on the VOC layout it
    wrote, with the user's CLIP (here the tiny one, from a local checkpoint) and the baseline CAMs."""
    from promptseg.pipeline import PipelineConfig, run_pipeline
    from promptseg.runtime.spec import read_metadata
    from promptseg.train.clip import TINY_CLIP

    annotations, images = _labelme_style_export(tmp_path / "export")
    result = CliRunner().invoke(import_coco_cmd, [str(annotations), "--images", str(images), "--out",
                                                  str(tmp_path / "voc"), "--val-share", "0.25", "--seed", "0"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({
        "out": str(tmp_path / "run"), "data": str(tmp_path / "voc"), "clip_model": TINY_CLIP,
        "clip_pretrained": str(tiny_clip), "methods": ["baseline"], "seg_methods": ["baseline"],
        "ship_method": "baseline", "baseline_epochs": 1, "seg_epochs": 1, "crf": "off", "calibration_images": 8,
        "bench_batches": [1], "bench_iters": 3, "threads": 1,
        "max_drop": 100.0}))  # a one-epoch network: the gate's numbers are not what this test is about
    from promptseg.configs import load_config

    report = run_pipeline(load_config(PipelineConfig, config), show_progress=False)
    assert report["methods"]["baseline"]["pseudo_mask_miou"] >= 0 and report["seg_val_miou"] >= 0
    assert read_metadata(tmp_path / "run" / "export" / "segmenter.onnx").class_names == ("background", *NAMES)
    trained = sorted(p.stem for p in (tmp_path / "run" / "pseudo_baseline").glob("*.png"))
    assert trained == sorted((tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
