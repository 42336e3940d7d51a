"""The CLIP-guided methods run end to end on the tiny world and keep their contracts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from promptseg.errors import ConfigError
from promptseg.train.cam_train import train_cam
from promptseg.train.clip import TINY_CLIP, ClipSpec, encode_prompts
from promptseg.train.config import CamTrainConfig, default_guidance
from promptseg.train.methods import PoleTrainer, load_text_features
from promptseg.train.prompts import BackgroundPrompts, ClipAdapter


def _cfg(world, out, method, clip, baseline, **guide):
    return CamTrainConfig(data=str(world), out=str(out), method=method, epochs=1, batch_size=16, cam_scales=(1.0,),
                          guidance=default_guidance(method, clip_pretrained=str(clip), init_from=str(baseline),
                                                    **guide))


def test_prompt_tokens_through_the_text_tower_equal_encode_text(tiny_clip):
    model, tokenizer = ClipSpec(TINY_CLIP, str(tiny_clip)).load()
    prompts = BackgroundPrompts(model, tokenizer, num_classes=2, length=5)
    x_embedding = model.token_embedding(tokenizer(["x"])[0, 1])
    with torch.no_grad():
        prompts.embeddings.copy_(x_embedding.expand(2, 5, -1))
        expected = encode_prompts(model, tokenizer, ["a photo of x x x x x."])
        torch.testing.assert_close(prompts(model), expected.expand(2, -1), atol=1e-6, rtol=0)
    # EOT sits at 5 + L, as in the reference
    assert int(prompts.tokens[0].argmax()) == 5 + 5


def test_prompts_learn_only_their_embeddings(tiny_clip):
    model, tokenizer = ClipSpec(TINY_CLIP, str(tiny_clip)).load()
    prompts = BackgroundPrompts(model, tokenizer, num_classes=3, length=4)
    prompts(model).sum().backward()
    assert prompts.embeddings.grad is not None and prompts.embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="prompt_length"):
        BackgroundPrompts(model, tokenizer, num_classes=1, length=40)


def test_clip_adapter_mixes_with_ratio():
    adapter = ClipAdapter(8)
    assert torch.all(adapter.ratio == 0.2) and adapter.mlp[0].weight.shape == (2, 8) and adapter.mlp[0].bias is None
    torch.nn.init.zeros_(adapter.mlp[2].weight)
    f = F.normalize(torch.randn(3, 8), dim=-1)
    torch.testing.assert_close(adapter(f), f)  # A(f) = 0 -> normalise(0.8 f) = f


def test_clims_runs_and_records_its_thresholds(tiny_world, tiny_clip, baseline_run, tmp_path):
    report = train_cam(_cfg(tiny_world, tmp_path, "clims", tiny_clip, baseline_run, cbs_threshold=None),
                       show_progress=False)
    assert report["method"] == "clims"
    assert report["cbs_threshold_source"].startswith("quantile")
    assert -1.0 <= report["cbs_threshold"] <= 1.0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"otm", "btm", "cbs", "reg"} <= set(log[0])


def test_pole_chooses_prompts_among_candidates(tiny_world, tiny_clip, baseline_run, tmp_path):
    report = train_cam(_cfg(tiny_world, tmp_path, "pole", tiny_clip, baseline_run), show_progress=False)
    saved = json.loads((tmp_path / "prompt_choices.json").read_text())
    classes = json.loads((tiny_world / "classes.json").read_text())
    labels = {line.strip() for line in (tiny_world / "ImageSets/Segmentation/train.txt").read_text().split()}
    assert set(saved["choices"]) == labels
    for per_image in saved["choices"].values():
        for cls, name in per_image.items():
            assert name in classes["synonyms"][cls]
    assert 0.0 <= report["prompt_changed_share"] <= 1.0
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["extra"]["image_adaptor"]["ratio"].shape == (128,)


def test_pole_never_reuses_choices_left_in_its_folder(tiny_world, tiny_clip, baseline_run, tmp_path):
    # a folder run before with another CLIP or network: its choices must not leak into this run
    ids = {line.strip() for line in (tiny_world / "ImageSets/Segmentation/train.txt").read_text().split()}
    stale = {i: {"boat": "stale-name"} for i in ids}
    (tmp_path / "prompt_choices.json").write_text(json.dumps({"candidates": {}, "choices": stale}))
    trainer = PoleTrainer(_cfg(tiny_world, tmp_path, "pole", tiny_clip, baseline_run))
    assert all("stale-name" not in per_image.values() for per_image in trainer.choices.values())
    saved = json.loads((tmp_path / "prompt_choices.json").read_text())
    assert saved["choices"] == trainer.choices


def test_semples_folds_prompts_that_match_the_training_code(tiny_world, tiny_clip, baseline_run, tmp_path):
    cfg = _cfg(tiny_world, tmp_path, "semples", tiny_clip, baseline_run, prompt_length=4, prompt_epochs=1)
    report = train_cam(cfg, show_progress=False)
    assert report["method"] == "semples" and "stage_a" in report
    assert (tmp_path / "cam_net.pt").is_file()  # the run's network is stage (c)'s
    folded = load_text_features(tmp_path / "stage_b")
    assert folded["text_features"].shape == (6, 128)
    assert folded["class_names"] == ["boat", "train", "cow", "plane", "car", "bird"]
    # recompute the features live from the saved prompt embeddings
    model, tokenizer = ClipSpec(TINY_CLIP, str(tiny_clip)).load()
    prompts = BackgroundPrompts(model, tokenizer, 6, 4)
    with torch.no_grad():
        prompts.embeddings.copy_(torch.load(tmp_path / "stage_b" / "prompts.pt", weights_only=True)["embeddings"])
        torch.testing.assert_close(prompts(model), folded["text_features"], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "stage_c" / "log.jsonl").read_text().splitlines()[0]).keys() >= {"refine"}
    # the generator's backbone stays frozen (weights and batch-norm statistics); the head learns
    start = torch.load(baseline_run / "cam_net.pt", weights_only=True)["net"]
    end = torch.load(tmp_path / "cam_net.pt", weights_only=True)["net"]
    assert not cfg.guidance.train_backbone
    for name, tensor in start.items():
        if name.startswith("classifier."):
            assert not torch.equal(tensor, end[name])
        else:
            assert torch.equal(tensor, end[name]), name


def test_guidance_must_match_the_classes(tiny_world, tiny_clip, baseline_run, tmp_path):
    with pytest.raises(ConfigError, match="class_words"):
        train_cam(_cfg(tiny_world, tmp_path, "clims", tiny_clip, baseline_run, class_words=("a", "b")),
                  show_progress=False)
