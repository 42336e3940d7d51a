"""VOC-layout reader: labels agree across every source, and every bad input is a DataError."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.data.images import mask_to_png_image
from promptseg.data.voc import (
    VOC_CLASSES,
    Sample,
    VOCDataset,
    load_cls_labels,
    save_cls_labels,
)
from promptseg.errors import DataError

# id -> (height, width, split, objects as (class name, y0, y1, x0, x1), difficult class names)
SPECS: dict[str, tuple[int, int, str, list[tuple[str, int, int, int, int]], set[str]]] = {
    "2007_000032": (16, 20, "train", [("aeroplane", 1, 8, 1, 10), ("person", 8, 15, 10, 19)], {"person"}),
    "2007_000033": (12, 14, "train", [("cat", 2, 10, 3, 12)], set()),
    "2008_000100": (16, 20, "train", [("dog", 0, 9, 0, 9), ("cat", 6, 16, 8, 20)], set()),
    "2008_000101": (10, 10, "val", [("bus", 2, 8, 2, 8)], set()),
}


def _mask(h: int, w: int, objects: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Boxes of class ids with a one-pixel 255 border, as VOC marks object outlines."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for cid, y0, y1, x0, x1 in objects:
        mask[y0:y1, x0:x1] = 255
        mask[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = cid
    return mask


def _xml(objects: list[tuple[str, int, int, int, int]], difficult: set[str]) -> str:
    parts = [
        f"<object><name>{name}</name><difficult>{int(name in difficult)}</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, y0, y1, x0, x1 in objects
    ]
    return f"<annotation><filename>x.jpg</filename>{''.join(parts)}</annotation>"


def expected_labels(classes: tuple[str, ...] = VOC_CLASSES) -> dict[str, np.ndarray]:
    out = {}
    for image_id, (_, _, _, objects, _) in SPECS.items():
        vec = np.zeros(len(classes), dtype=np.float32)
        for name, *_ in objects:
            vec[classes.index(name)] = 1.0
        out[image_id] = vec
    return out


def expected_mask(image_id: str, classes: tuple[str, ...] = VOC_CLASSES) -> np.ndarray:
    h, w, _, objects, _ = SPECS[image_id]
    return _mask(h, w, [(classes.index(n) + 1, y0, y1, x0, x1) for n, y0, y1, x0, x1 in objects])


def build_tree(root: Path, classes: tuple[str, ...] = VOC_CLASSES) -> Path:
    """A tiny VOC 2012 tree: JPEGs, palette masks, list files, XML, string-key cls_labels.npy."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for image_id, (h, w, split, objects, difficult) in SPECS.items():
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        mask_to_png_image(expected_mask(image_id, classes)).save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(objects, difficult))
        splits[split].append(image_id)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(splits["train"]) + "\n")
    # tolerant parsing: blank lines, surrounding whitespace, extra columns
    (lists / "val.txt").write_text(f"\n  {splits['val'][0]}  1\n\n")
    save_cls_labels(root / "cls_labels.npy", expected_labels(classes))
    return root


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "voc")


def _int_key_form(labels: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """CLIMS's cls_labels.npy keys: the id as an int with the underscore removed."""
    return {int(k.replace("_", "")): v for k, v in labels.items()}


def _labels_of(ds: VOCDataset) -> dict[str, np.ndarray]:
    return {s.id: s.labels for s in ds}


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("source", ["cls_str", "cls_int", "xml", "masks"])
def test_labels_agree_across_sources(voc: Path, source: str) -> None:
    if source == "cls_int":
        with open(voc / "cls_labels.npy", "wb") as fh:
            np.save(fh, _int_key_form(expected_labels()), allow_pickle=True)
    labels = {"cls_str": "auto", "cls_int": "cls_labels", "xml": "xml", "masks": "masks"}[source]
    ds = VOCDataset(voc, "train", labels=labels)
    assert ds.ids == ["2007_000032", "2007_000033", "2008_000100"]
    got = _labels_of(ds)
    want = expected_labels()
    for image_id in ds.ids:
        np.testing.assert_array_equal(got[image_id], want[image_id])
        assert got[image_id].dtype == np.float32


def test_load_cls_labels_both_key_forms(tmp_path: Path) -> None:
    want = expected_labels()
    save_cls_labels(tmp_path / "str.npy", want)
    with open(tmp_path / "int.npy", "wb") as fh:
        np.save(fh, _int_key_form(want), allow_pickle=True)
    assert not list(tmp_path.glob("*.npy.npy")) and not list(tmp_path.glob(".*tmp"))
    for name in ("str.npy", "int.npy"):
        got = load_cls_labels(tmp_path / name, 20)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_auto_label_source_falls_back(voc: Path) -> None:
    assert VOCDataset(voc).label_source == "cls_labels"
    (voc / "cls_labels.npy").unlink()
    assert VOCDataset(voc).label_source == "xml"
    shutil.rmtree(voc / "Annotations")
    ds = VOCDataset(voc)
    assert ds.label_source == "masks"
    np.testing.assert_array_equal(ds[0].labels, expected_labels()["2007_000032"])


def test_images_and_masks_load(voc: Path) -> None:
    ds = VOCDataset(voc, "train")
    assert len(ds) == 3 and ds.num_classes == 20 and ds.class_names == VOC_CLASSES
    for sample in ds:
        assert isinstance(sample, Sample)
        h, w = SPECS[sample.id][:2]
        image = sample.load_image()
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        mask = sample.load_mask()
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected_mask(sample.id))
        assert sample.context_path is None
    assert ds[-1].id == "2008_000100"
    with pytest.raises(IndexError):
        ds[3]


def test_val_list_tolerates_blank_lines_and_columns(voc: Path) -> None:
    ds = VOCDataset(voc, "val")
    assert ds.ids == ["2008_000101"]
    assert 255 in ds[0].load_mask()


def test_custom_list_file(voc: Path) -> None:
    (voc / "mine.txt").write_text("2008_000100\n2007_000033\n")
    for list_file in ("mine.txt", voc / "mine.txt"):
        ds = VOCDataset(voc, "custom", list_file=list_file)
        assert ds.ids == ["2008_000100", "2007_000033"]
        np.testing.assert_array_equal(ds[0].labels, expected_labels()["2008_000100"])


def test_segmentation_class_aug_grey_masks(voc: Path) -> None:
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    for path in (voc / "SegmentationClass").glob("*.png"):
        ids = np.array(Image.open(path))
        Image.fromarray(ids, mode="L").save(aug / path.name)
    shutil.rmtree(voc / "SegmentationClass")
    ds = VOCDataset(voc, "train", labels="masks")
    for sample in ds:
        assert sample.mask_path is not None and sample.mask_path.parent.name == "SegmentationClassAug"
        np.testing.assert_array_equal(sample.load_mask(), expected_mask(sample.id))
        np.testing.assert_array_equal(sample.labels, expected_labels()[sample.id])


def test_auto_masks_fall_back_per_id_to_aug(voc: Path) -> None:
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    (voc / "SegmentationClass" / "2007_000033.png").rename(aug / "2007_000033.png")
    ds = VOCDataset(voc, "train")
    assert [s.mask_path.parent.name for s in ds if s.mask_path] == [
        "SegmentationClass", "SegmentationClassAug", "SegmentationClass"
    ]
    with pytest.raises(DataError, match=r"2007_000032\.png: mask of id '2007_000032' listed in"):
        VOCDataset(voc, "train", mask_dir="SegmentationClassAug")  # explicit dirs must hold every mask


def test_no_masks_gives_none(voc: Path) -> None:
    shutil.rmtree(voc / "SegmentationClass")
    sample = VOCDataset(voc, "train")[0]
    assert sample.mask_path is None
    with pytest.raises(DataError, match="no segmentation mask"):
        sample.load_mask()


def test_classes_json_names_and_context(tmp_path: Path) -> None:
    classes = ("aeroplane", "bus", "cat", "dog", "person")
    root = build_tree(tmp_path / "synth", classes)
    (root / "classes.json").write_text(json.dumps({"names": list(classes), "synth_config": {"seed": 0}}))
    (root / "ContextMasks").mkdir()
    context = np.zeros((12, 14), dtype=np.uint8)
    context[:, :3] = 3
    Image.fromarray(context, mode="L").save(root / "ContextMasks" / "2007_000033.png")
    ds = VOCDataset(root, "train")
    assert ds.class_names == classes and ds.num_classes == 5
    np.testing.assert_array_equal(ds[1].labels, [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(ds[1].load_mask(), expected_mask("2007_000033", classes))
    np.testing.assert_array_equal(ds[1].load_context(), context)
    assert ds[0].context_path is None
    with pytest.raises(DataError, match="no context mask"):
        ds[0].load_context()
    explicit = VOCDataset(root, "train", class_names=classes, labels="xml")
    np.testing.assert_array_equal(explicit[2].labels, [0, 0, 1, 1, 0])


# ----------------------------------------------------------------------------- bad inputs


def _rewrite_mask(image_id: str, mask: np.ndarray) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        mask_to_png_image(mask).save(root / "SegmentationClass" / f"{image_id}.png")

    return mutate


def _truncate_jpeg(root: Path) -> None:
    path = root / "JPEGImages" / "2007_000033.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _xml_unknown_class(root: Path) -> None:
    path = root / "Annotations" / "2007_000033.xml"
    path.write_text(path.read_text().replace("<name>cat</name>", "<name>unicorn</name>"))


def _short_cls_labels(root: Path) -> None:
    save_cls_labels(root / "cls_labels.npy", {k: v[:19] for k, v in expected_labels().items()})


def _cls_labels_missing_id(root: Path) -> None:
    labels = expected_labels()
    del labels["2007_000033"]
    save_cls_labels(root / "cls_labels.npy", labels)


def _cls_labels_not_dict(root: Path) -> None:
    with open(root / "cls_labels.npy", "wb") as fh:
        np.save(fh, np.zeros((4, 20), dtype=np.float32))


def _nothing(root: Path) -> None:
    return None


BAD_CASES = [
    ("missing_root", _nothing, lambda r: VOCDataset(r / "absent"), r"absent: dataset root not found"),
    (
        "missing_split",
        _nothing,
        lambda r: VOCDataset(r, "test"),
        r"test\.txt: split 'test' not found \| expected one of: train, val",
    ),
    (
        "missing_list_file",
        _nothing,
        lambda r: VOCDataset(r, list_file="nope.txt"),
        r"nope\.txt: list file not found",
    ),
    (
        "missing_jpeg",
        lambda r: (r / "JPEGImages" / "2007_000033.jpg").unlink(),
        lambda r: VOCDataset(r),
        r"2007_000033\.jpg: image of id '2007_000033' listed in .*train\.txt not found",
    ),
    (
        "truncated_jpeg",
        _truncate_jpeg,
        lambda r: VOCDataset(r)[1].load_image(),
        r"2007_000033\.jpg: (unreadable|not an image)",
    ),
    (
        "mask_size_mismatch",
        _rewrite_mask("2007_000033", np.zeros((12, 15), dtype=np.uint8)),
        lambda r: VOCDataset(r)[1].load_mask(),
        r"2007_000033\.png: mask size 15x12 \(WxH\) differs from image .*2007_000033\.jpg size 14x12",
    ),
    (
        "mask_unknown_class_id",
        _rewrite_mask("2007_000033", np.full((12, 14), 30, dtype=np.uint8)),
        lambda r: VOCDataset(r)[1].load_mask(),
        r"2007_000033\.png: mask ids \[30\] out of range \| expected 0\.\.20 or 255",
    ),
    (
        "mask_unknown_class_id_when_deriving_labels",
        _rewrite_mask("2007_000033", np.full((12, 14), 21, dtype=np.uint8)),
        lambda r: VOCDataset(r, labels="masks")[1],
        r"2007_000033\.png: mask ids \[21\] out of range",
    ),
    (
        "xml_unknown_class",
        _xml_unknown_class,
        lambda r: VOCDataset(r, labels="xml"),
        r"2007_000033\.xml: object class 'unicorn' unknown \| expected one of aeroplane",
    ),
    (
        "xml_missing",
        lambda r: (r / "Annotations" / "2007_000033.xml").unlink(),
        lambda r: VOCDataset(r, labels="xml"),
        r"2007_000033\.xml: annotation file not found",
    ),
    (
        "cls_labels_wrong_length",
        _short_cls_labels,
        lambda r: VOCDataset(r),
        r"cls_labels\.npy: key '2007_000032' has a label vector of length 19 \| expected length 20",
    ),
    (
        "cls_labels_missing_id",
        _cls_labels_missing_id,
        lambda r: VOCDataset(r),
        r"cls_labels\.npy: no labels for 1 listed id\(s\): 2007_000033",
    ),
    (
        "cls_labels_not_dict",
        _cls_labels_not_dict,
        lambda r: VOCDataset(r),
        r"cls_labels\.npy: holds ndarray \| expected a dict",
    ),
    (
        "bad_classes_json",
        lambda r: (r / "classes.json").write_text(json.dumps({"names": "cat"})),
        lambda r: VOCDataset(r),
        r"classes\.json: 'names' is 'cat'",
    ),
    (
        "explicit_mask_dir_missing",
        _nothing,
        lambda r: VOCDataset(r, mask_dir="SegmentationClassAug"),
        r"SegmentationClassAug: mask directory not found",
    ),
    (
        "bad_label_source",
        _nothing,
        lambda r: VOCDataset(r, labels="captions"),
        r"labels='captions' \| expected one of auto, cls_labels, xml, masks",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "action", "match"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_inputs_raise_data_error(
    voc: Path, mutate: Callable[[Path], None], action: Callable[[Path], object], match: str
) -> None:
    mutate(voc)
    with pytest.raises(DataError, match=match):
        action(voc)
