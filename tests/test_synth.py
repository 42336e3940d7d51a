from __future__ import annotations

import json

import numpy as np
import pytest

from promptseg.data.images import load_mask
from promptseg.data.synth import WORLD_CLASSES, SynthConfig, write_world
from promptseg.data.voc import VOCDataset, labels_from_mask
from promptseg.errors import ConfigError


def _label_files(root):
    files = [root / "cls_labels.npy", root / "captions.jsonl", root / "classes.json"]
    files += sorted((root / "SegmentationClass").glob("*.png"))
    files += sorted((root / "ContextMasks").glob("*.png"))
    files += sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
    return files


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_world(tmp_path / "a", SynthConfig(seed=7, train=20, val=6))
    b = write_world(tmp_path / "b", SynthConfig(seed=7, train=20, val=6))
    files_a, files_b = _label_files(a), _label_files(b)
    assert [f.relative_to(a) for f in files_a] == [f.relative_to(b) for f in files_b]
    assert len(files_a) == 3 + 2 * 26 + 3  # train, val and clip lists
    for fa, fb in zip(files_a, files_b, strict=False):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
    c = write_world(tmp_path / "c", SynthConfig(seed=8, train=20, val=6))
    assert (c / "cls_labels.npy").read_bytes() != (a / "cls_labels.npy").read_bytes()


def test_web_images_are_a_labelled_split_without_masks(tiny_world):
    web = VOCDataset(tiny_world, "clip")
    assert len(web) == 64 and not web.has_masks and VOCDataset(tiny_world, "train").has_masks
    captions = {json.loads(line)["id"]: json.loads(line) for line in
                (tiny_world / "captions.jsonl").read_text().splitlines()}
    synonyms = json.loads((tiny_world / "classes.json").read_text())["synonyms"]  # every caption word
    for sample in web:
        assert sample.mask_path is None and sample.id.startswith("web_")
        named = {name for name, words in synonyms.items() for region in captions[sample.id]["regions"]
                 for word in words if region["captions"][0] == f"a photo of a {word}."}
        assert named == {web.class_names[k] for k in np.flatnonzero(sample.labels)}  # labels = objects drawn


def test_voc_reader_reads_the_world(tiny_world):
    train, val = VOCDataset(tiny_world, "train"), VOCDataset(tiny_world, "val")
    assert (len(train), len(val)) == (96, 32)
    assert train.class_names == tuple(c.name for c in WORLD_CLASSES)
    for sample in list(train)[:20]:
        image, mask, context = sample.load_image(), sample.load_mask(), sample.load_context()
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == context.shape == (64, 64)
        # the image labels are exactly the classes painted in the mask
        np.testing.assert_array_equal(sample.labels, labels_from_mask(mask, train.num_classes))
        assert 1 <= sample.labels.sum() <= 3
        # VOC-style ignore border, and context never under an object
        assert (mask == 255).any()
        assert not ((context > 0) & (mask > 0) & (mask != 255)).any()


def test_classes_cooccur_with_their_context(tmp_path):
    root = write_world(tmp_path / "w", SynthConfig(seed=1, train=300, val=1))
    drawn = [obj["context_drawn"] for line in (root / "objects.jsonl").read_text().splitlines()
             for obj in json.loads(line)["objects"]]
    assert 0.78 <= np.mean(drawn) <= 0.92  # configured 0.85
    # ContextMasks agree: each drawn context carries the id of its own class
    sample = VOCDataset(root, "train")[0]
    context, mask = sample.load_context(), load_mask(sample.mask_path)
    present = set(np.unique(mask[(mask > 0) & (mask < 255)]).tolist())
    assert set(np.unique(context[context > 0]).tolist()) <= present


def test_captions_use_the_variant_synonym(tiny_world):
    classes = json.loads((tiny_world / "classes.json").read_text())
    for name, candidates in classes["synonyms"].items():
        assert candidates[0] == name and len(candidates) >= 3
    objects = [json.loads(line) for line in (tiny_world / "objects.jsonl").read_text().splitlines()]
    captions = {row["id"]: row for row in map(json.loads, (tiny_world / "captions.jsonl").read_text().splitlines())}
    synonym_captioned = 0
    for row in objects:
        for obj in row["objects"]:
            if obj["variant"] != obj["class"]:  # the synonym variant
                synonym_captioned += obj["variant"] in " ".join(captions[row["id"]]["captions"])
    assert synonym_captioned > 10
    # every POLE candidate is a word CLIP reads in some caption (an unread word has no meaning to it)
    words = {w.strip(".") for row in captions.values() for caption in row["captions"] for w in caption.split()}
    assert {w for candidates in classes["synonyms"].values() for w in candidates} <= words
    # regions lie inside the image
    for row in captions.values():
        for region in row["regions"]:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


@pytest.mark.parametrize(
    "kwargs, match",
    [({"size": 16}, "size"), ({"train": 0}, "train/val"), ({"context_prob": 1.5}, "context_prob"),
     ({"max_objects": 9}, "max_objects")],
)
def test_bad_config_is_rejected(kwargs, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        write_world(tmp_path, SynthConfig(**kwargs))
