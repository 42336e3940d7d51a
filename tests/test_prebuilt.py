"""The shipped stand-ins (tiny CLIP, CAM backbone) and the command that builds them."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch

from promptseg import prebuilt
from promptseg.errors import PromptsegError
from promptseg.pipeline import (
    PipelineConfig,
    base_cam_config,
    clip_train_config,
    pretrain_config,
    run_standins,
    use_prebuilt,
)
from promptseg.train.cam_net import CamNet, CamNetConfig
from promptseg.train.clip import ClipSpec

TOY_WORLD = dict(train_images=24, val_images=8, clip_images=24, clip_steps=2, pretrain_epochs=1)


def _without_paths(config: dict) -> dict:
    """A stage config minus where it ran (data/out folders and the backbone file's location)."""
    config = {k: v for k, v in config.items() if k not in ("data", "out")}
    if "net" in config:
        config["net"] = {k: v for k, v in config["net"].items() if k != "pretrained"}
    return config


def test_the_shipped_stand_ins_are_what_the_current_build_command_trains(tmp_path):
    manifest = prebuilt.load_manifest()  # every file's sha256 checked
    cfg = prebuilt.standin_pipeline(tmp_path, manifest["seed"], manifest["threads"])
    base = base_cam_config(cfg, tmp_path / "data")
    expected = json.loads(json.dumps({"clip": asdict(clip_train_config(cfg, tmp_path / "data")),
                                      "pretrain": asdict(pretrain_config(cfg, base))}))  # tuples as JSON lists
    # a changed default (CLIP steps, backbone epochs, crop, lr, ...) makes the shipped files stale: rebuild them
    assert {k: _without_paths(v) for k, v in manifest["stage_configs"].items()} == \
        {k: _without_paths(v) for k, v in expected.items()}
    model, _ = ClipSpec(pretrained=str(prebuilt.clip_dir())).load()
    assert model.visual.image_size in (64, (64, 64))
    net = CamNet(CamNetConfig(pretrained=str(prebuilt.backbone_file())), 6)
    trunk = torch.load(prebuilt.backbone_file(), weights_only=True)["net"]
    assert torch.equal(net.state_dict()["trunk.0.0.conv1.weight"], trunk["trunk.0.0.conv1.weight"])


def test_a_tampered_or_missing_stand_in_is_refused(tmp_path):
    copy = tmp_path / "prebuilt"
    shutil.copytree(prebuilt.PREBUILT_DIR, copy)
    data = bytearray((copy / "pretrain" / "report.json").read_bytes())
    (copy / "pretrain" / "report.json").write_bytes(bytes(data) + b" ")
    with pytest.raises(PromptsegError, match="not the file the manifest records; rebuild with `promptseg prebuilt"):
        prebuilt.load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(PromptsegError, match="no prebuilt stand-ins .* --from-scratch"):
        prebuilt.load_manifest(copy)


def test_the_build_command_reproduces_its_own_output(tmp_path):
    prebuilt.build(tmp_path / "a", show_progress=False, threads=1, **TOY_WORLD)
    prebuilt.build(tmp_path / "b", show_progress=False, threads=1, **TOY_WORLD)
    for name in ("clip/clip.pt", "pretrain/cam_net.pt"):  # same seed, same machine: the same weights
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        weights = a.get("state_dict", a.get("net"))
        other = b.get("state_dict", b.get("net"))
        assert weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights)
    assert prebuilt.load_manifest(tmp_path / "a")["stage_configs"]["clip"]["steps"] == 2
    assert not (tmp_path / "a" / "work").exists()


def test_the_demo_takes_the_shipped_stand_ins(tmp_path):
    cfg = PipelineConfig(out=str(tmp_path), train_images=16, val_images=48, clip_images=8, threads=1)
    timings: dict = {}
    standins = run_standins(cfg, timings, show_progress=False)
    assert standins["clip_pretrained"] == str(prebuilt.clip_dir())
    assert standins["base"].net.pretrained == str(prebuilt.backbone_file())
    assert "prebuilt" in standins["report"]["cam_backbone"] and "pretrain" not in timings
    clip_report = json.loads((tmp_path / "clip" / "report.json").read_text())
    assert clip_report["pretrained"] == str(prebuilt.clip_dir())  # scored on this world, not retrained
    assert 0.3 < clip_report["clip_zero_shot_map"] == standins["report"]["clip_zero_shot_map"] <= 1.0
    # the user's own data, CLIP or CAM network, or --from-scratch: no shipped stand-in fits
    assert use_prebuilt(PipelineConfig())
    for other in (dict(data="."), dict(clip_pretrained="openai"), dict(clip_model="ViT-B-32"),
                  dict(cam_config="configs/voc_baseline.json"), dict(prebuilt=False)):
        assert not use_prebuilt(PipelineConfig(**other))


def test_the_package_stays_under_the_wheel_budget():
    """Package files, uncompressed (the wheel's upper bound): the stand-ins must not push it past 50 MB."""
    root = prebuilt.PREBUILT_DIR.parent.parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 50 * 2**20
