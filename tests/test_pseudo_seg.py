from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from promptseg.data.voc import VOCDataset
from promptseg.errors import ConfigError, DataError, PromptsegError
from promptseg.runtime.processing import cams_to_mask
from promptseg.train import pseudo
from promptseg.train.checkpoint import load_checkpoint
from promptseg.train.pseudo import PseudoMaskConfig, make_pseudo_masks
from promptseg.train.seg import Segmenter, SegTrainConfig, train_segmenter


@pytest.fixture(scope="module")
def pseudo_dir(baseline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pseudo")
    make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(out), cam_scales=(1.0,)),
                      show_progress=False)
    return out


def test_pseudo_masks_cover_the_split(pseudo_dir, tiny_world, baseline_run):
    ids = VOCDataset(tiny_world, "train").ids
    assert sorted(p.stem for p in pseudo_dir.glob("*.png")) == sorted(ids)
    with Image.open(pseudo_dir / f"{ids[0]}.png") as img:
        assert img.mode == "P" and img.size == (64, 64)
        values = set(np.unique(np.asarray(img)).tolist())
    assert values <= set(range(7))
    report = json.loads((pseudo_dir / "report.json").read_text())
    run = json.loads((baseline_run / "report.json").read_text())
    assert report["method"] == "baseline" and report["cam_threshold_source"] == "best on val"
    assert report["low"] == report["cam_threshold"]  # no CRF: the CAM threshold chosen on val
    # same CAMs (1 scale + flip) as the run scored: same threshold, same CAM mIoU and leak
    assert report["cam_threshold"] == run["background_threshold"]
    assert report["cam_miou"] == pytest.approx(run["cam_miou"]) == report["cam_run_cam_miou"]
    assert report["context_leak"] == pytest.approx(run["context_leak"])
    assert report["cam_miou"] <= report["oracle_cam_miou"] and report["cam_scales"] == [1.0]
    assert 0.0 <= report["pseudo_mask_miou"] <= 100.0 and report["ignored_share"] == 0.0
    per_class = report["pseudo_mask_per_class_iou"]
    assert list(per_class) == ["background", *VOCDataset(tiny_world, "train").class_names]
    present = [v for v in per_class.values() if v is not None]
    assert abs(sum(present) / len(present) - report["pseudo_mask_miou"]) < 1e-9


def test_ignore_band_marks_uncertain_pixels(baseline_run, tmp_path):
    report = make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(tmp_path), low=0.2, high=0.8,
                                                cam_scales=(1.0,)), show_progress=False)
    assert 0.0 < report["ignored_share"] < 1.0
    with pytest.raises(ConfigError, match="high"):
        make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(tmp_path), low=0.5, high=0.2))


def test_crf_says_when_it_cannot_run(baseline_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pseudo, "crf_available", lambda: False)
    with pytest.raises(PromptsegError, match="pydensecrf"):
        make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(tmp_path), crf=True,
                                           cam_scales=(1.0,)), show_progress=False)
    assert not (tmp_path / "report.json").exists()


needs_crf = pytest.mark.skipif(not pseudo.crf_available(), reason="pydensecrf not installed (the crf extra)")


@needs_crf
def test_crf_snaps_a_blurry_map_to_the_object_edges():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal([40, 140, 40], 12, (64, 64, 3)), 0, 255).astype(np.uint8)  # grass
    image[20:36, 24:40] = (220, 30, 30)  # a red square
    truth = np.zeros((64, 64), bool)
    truth[20:36, 24:40] = True
    yy, xx = np.mgrid[:64, :64]
    blob = np.exp(-((yy - 24) ** 2 + (xx - 30) ** 2) / (2 * 11.0 ** 2)).astype(np.float32)  # off-centre, too wide
    cams = np.stack([blob, np.zeros_like(blob)])

    def iou(mask):
        return (mask & truth).sum() / (mask | truth).sum()

    thresholded = iou(cams_to_mask(cams, 0.5) == 1)
    refined = pseudo.refine_with_crf(image, cams, 0.5)
    assert set(np.unique(refined)) <= {0, 1}
    assert iou(refined == 1) > 0.9 > thresholded + 0.2


@needs_crf
def test_crf_keeps_only_labelled_classes_and_maps_back_to_their_ids():
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(120, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    image[8:20, 8:20] = (30, 30, 220)
    cams = np.zeros((6, 32, 32), np.float32)
    cams[4, 6:22, 6:22] = 1.0  # class index 4 -> id 5; the other five are not labelled
    mask = pseudo.refine_with_crf(image, cams, 0.5)
    assert set(np.unique(mask)) == {0, 5} and (mask[8:20, 8:20] == 5).all()
    assert (pseudo.refine_with_crf(image, np.zeros_like(cams), 0.5) == 0).all()  # nothing labelled


@needs_crf
def test_crf_in_worker_processes_matches_one_process():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    cams = rng.random((5, 3, 24, 24)).astype(np.float32)
    cams[:, 1] = 0
    with pseudo.crf_runner(1) as one, pseudo.crf_runner(2) as two:
        for a, b in zip(one(images, cams, 0.4), two(images, cams, 0.4), strict=True):
            np.testing.assert_array_equal(a, b)


@needs_crf
def test_crf_background_level_is_chosen_on_val(baseline_run, tmp_path):
    report = make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(tmp_path), crf=True,
                                                cam_scales=(1.0,)), show_progress=False)
    scores = {float(k): v for k, v in report["crf_val_miou"].items()}
    assert sorted(scores) == list(pseudo.CRF_BACKGROUND_LEVELS)  # every level, scored on val
    assert report["crf"] is True and report["low"] == max(scores, key=scores.get)
    assert report["low_source"] == "best CRF level on val"
    assert 0.0 <= report["pseudo_mask_miou"] <= 100.0


def test_segmenter_shapes():
    model = Segmenter("lraspp_mobilenet_v3_large", num_classes=6, input_size=64).eval()
    assert model(torch.zeros(2, 3, 48, 80)).shape == (2, 7, 48, 80)


def test_segmenter_trains_on_pseudo_masks(tiny_world, pseudo_dir, tmp_path):
    report = train_segmenter(SegTrainConfig(data=str(tiny_world), out=str(tmp_path), masks=str(pseudo_dir),
                                            epochs=1, batch_size=16, input_size=64), show_progress=False)
    assert 0.0 <= report["seg_val_miou"] <= 100.0 and report["trained_on"] == str(pseudo_dir)
    saved = torch.load(tmp_path / "segmenter.pt", weights_only=True)
    assert saved["class_names"] == ["boat", "train", "cow", "plane", "car", "bird"] and saved["input_size"] == 64
    assert (tmp_path / "val.png").is_file()
    assert load_checkpoint(tmp_path / "train_state.pt")["epoch"] == 1  # resumable: loads weights_only


def test_segmenter_names_bad_mask_folders(tiny_world, pseudo_dir, tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_segmenter(SegTrainConfig(data=str(tiny_world), out=str(tmp_path), masks=str(tmp_path / "nope")),
                        show_progress=False)
    first = VOCDataset(tiny_world, "train").ids[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for png in pseudo_dir.glob("*.png"):
        (broken / png.name).write_bytes(png.read_bytes())
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(broken / f"{first}.png")
    with pytest.raises(DataError, match=first):
        train_segmenter(SegTrainConfig(data=str(tiny_world), out=str(tmp_path / "run"), masks=str(broken),
                                       epochs=1, batch_size=200, input_size=64), show_progress=False)


def test_mask_change_share_counts_the_pixels_that_differ_from_another_runs_masks(pseudo_dir, baseline_run, tmp_path):
    from promptseg.data.images import load_mask, mask_to_png_image

    other = tmp_path / "generator"
    shutil.copytree(pseudo_dir, other)
    first = sorted(other.glob("*.png"))[0]
    mask = load_mask(first)
    mask[:3, :5] = (mask[:3, :5] + 1) % 7  # 15 pixels now differ from what the same CAMs give
    mask_to_png_image(mask).save(first)
    report = make_pseudo_masks(PseudoMaskConfig(cam_run=str(baseline_run), out=str(tmp_path / "again"),
                                                cam_scales=(1.0,), compare_to=str(other)), show_progress=False)
    pixels = sum(m.size for m in map(load_mask, (tmp_path / "again").glob("*.png")))
    assert report["mask_change_share"] == 15 / pixels and report["compared_to"] == str(other)
