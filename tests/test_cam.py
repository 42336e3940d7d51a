from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import promptseg.train.cam_train as cam_train_mod
from promptseg.errors import ConfigError
from promptseg.runtime.processing import cams_to_mask
from promptseg.train.cam_net import CamNet, CamNetConfig
from promptseg.train.cam_train import train_cam
from promptseg.train.cams import infer_cams, score_cams
from promptseg.train.config import CamTrainConfig


@pytest.mark.parametrize("cfg, side", [
    (CamNetConfig("resnet18", stages=3, output_stride=8), 8),
    (CamNetConfig("resnet18", stages=3, output_stride=16), 4),
    (CamNetConfig("resnet18", stages=2, output_stride=4), 16),
    (CamNetConfig("resnet50", stages=4, output_stride=16), 4),
])
def test_cam_net_output_stride(cfg, side):
    net = CamNet(cfg, num_classes=5).eval()
    cams = net(torch.zeros(2, 3, 64, 64))
    assert cams.shape == (2, 5, side, side)
    assert net.classifier.bias is None
    torch.testing.assert_close(CamNet.logits(cams), cams.mean((2, 3)))


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "vgg16"}, "arch"), ({"stages": 1}, "stages"), ({"stages": 2, "output_stride": 16}, "output_stride"),
])
def test_cam_net_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CamNetConfig(**kwargs).validate()


def test_cam_net_starts_from_another_runs_trunk(tmp_path):
    donor = CamNet(CamNetConfig(), num_classes=3)
    torch.save({"net": donor.state_dict(), "num_classes": 3}, tmp_path / "cam_net.pt")  # a CAM run's checkpoint
    net = CamNet(CamNetConfig(pretrained=str(tmp_path / "cam_net.pt")), num_classes=5)
    for name, value in donor.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(net.state_dict()[name], value), name
    assert net.classifier.weight.shape == (5, 256, 1, 1)  # a new classifier for this run's classes
    with pytest.raises(ConfigError, match="another shape"):
        CamNet(CamNetConfig(stages=2, output_stride=8, pretrained=str(tmp_path / "cam_net.pt")), num_classes=3)


def test_infer_cams_keeps_only_labelled_classes():
    torch.manual_seed(0)
    net = CamNet(CamNetConfig(), num_classes=3).eval()
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    labels = np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32)
    cams = infer_cams(net, images, labels, scales=(1.0, 0.5))
    assert cams.shape == (2, 3, 64, 64) and cams.dtype == np.float32
    assert (cams[0, 1] == 0).all() and (cams[1, 0] == 0).all() and (cams[1, 2] == 0).all()
    assert cams.max() <= 1.0 + 1e-6 and cams.min() >= 0.0


def test_score_cams_on_perfect_and_leaky_maps():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1
    context = np.zeros((4, 4), np.uint8)
    context[2:, :] = 1  # class 1's context: the bottom half
    perfect = np.zeros((1, 4, 4), np.float32)
    perfect[0][gt == 1] = 1.0
    leaky = perfect.copy()
    leaky[0, 2:, :2] = 0.9  # 4 extra pixels on the context
    result = score_cams([(perfect, gt, context)], num_classes=1, threshold=0.5)
    assert result["cam_miou"] == pytest.approx(100.0) and result["context_leak"] == 0.0
    result = score_cams([(leaky, gt, context)], num_classes=1, threshold=0.5)
    # class 1: 4 / 8 pixels IoU 0.5; background: 8 / 12; leak: 4 of 8 predicted pixels
    assert result["cam_miou"] == pytest.approx(100 * (0.5 + 8 / 12) / 2)
    assert result["context_leak"] == pytest.approx(0.5)
    np.testing.assert_array_equal(cams_to_mask(leaky, 0.95), gt)  # the 0.9 leak falls below 0.95


def test_baseline_run_writes_its_files(baseline_run):
    report = json.loads((baseline_run / "report.json").read_text())
    for key in ("method", "seed", "cam_miou", "context_leak", "oracle_cam_miou", "background_threshold"):
        assert key in report, key
    assert report["method"] == "baseline" and 0 <= report["cam_miou"] <= 100
    assert report["background_threshold_source"] == "best on val"
    config = json.loads((baseline_run / "config.json").read_text())
    assert config["net"]["arch"] == "resnet18" and config["epochs"] == 1
    assert (baseline_run / "cam_net.pt").is_file() and (baseline_run / "log.jsonl").is_file()
    torch.load(baseline_run / "cam_net.pt", weights_only=True)


def _kill_after_first_epoch(monkeypatch):
    original = cam_train_mod.save_checkpoint

    def killed(path, state):
        original(path, state)
        if state.get("epoch") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(cam_train_mod, "save_checkpoint", killed)
    return original


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_world, tmp_path, monkeypatch):
    def cfg(out):
        return CamTrainConfig(data=str(tiny_world), out=str(out), epochs=2, batch_size=16, cam_scales=(1.0,),
                              threads=1)

    straight = train_cam(cfg(tmp_path / "a"), show_progress=False)
    original = _kill_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_cam(cfg(tmp_path / "b"), show_progress=False)
    monkeypatch.setattr(cam_train_mod, "save_checkpoint", original)
    resumed = train_cam(cfg(tmp_path / "b"), resume=True, show_progress=False)
    for key in ("cam_miou", "context_leak", "oracle_cam_miou"):
        assert resumed[key] == straight[key], key
    a = torch.load(tmp_path / "a" / "cam_net.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "b" / "cam_net.pt", weights_only=True)["net"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_resumed_randaugment_run_draws_the_crops_of_an_uninterrupted_one(tiny_world, tmp_path, monkeypatch):
    """timm's RandAugment picks its ops with NumPy's RNG: the checkpoint carries that state too."""
    monkeypatch.setattr(cam_train_mod.CamTrainer, "evaluate", lambda self, **_: {"background_threshold": 0.15})
    monkeypatch.setattr(cam_train_mod.CamTrainer, "save_pictures", lambda self, threshold: None)

    def cfg(out):
        return CamTrainConfig(data=str(tiny_world), out=str(out), epochs=2, batch_size=32, crop=32, val_split=None,
                              threads=1, augment="randaugment")

    train_cam(cfg(tmp_path / "a"), show_progress=False)
    original = _kill_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_cam(cfg(tmp_path / "b"), show_progress=False)
    monkeypatch.setattr(cam_train_mod, "save_checkpoint", original)
    train_cam(cfg(tmp_path / "b"), resume=True, show_progress=False)
    a = torch.load(tmp_path / "a" / "cam_net.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "b" / "cam_net.pt", weights_only=True)["net"]
    assert all(torch.equal(a[name], b[name]) for name in a)
