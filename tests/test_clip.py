from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

import promptseg.train.clip as clip_mod
from promptseg.errors import ConfigError, DataError, PromptsegError
from promptseg.train.clip import (
    TINY_CLIP,
    ClipSpec,
    ClipTrainConfig,
    clip_normalize,
    masked_to_mean,
    pretraining_corpus,
    read_captions,
    train_clip,
)


def _cfg(world, out, **kw):
    base = dict(data=str(world), out=str(out), steps=4, batch_size=16, warmup_steps=2, checkpoint_every=2)
    base.update(kw)
    return ClipTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    report = train_clip(_cfg(tiny_world, out), show_progress=False)
    return out, report


def test_checkpoint_loads_through_open_clip(trained):
    out, report = trained
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(out / "clip.pt"))
    saved = torch.load(out / "clip.pt", weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])
    assert 0.0 <= report["clip_zero_shot_map"] <= 1.0
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["clip_zero_shot_map"] == pytest.approx(report["clip_zero_shot_map"])
    assert set(on_disk["clip_zero_shot_ap"]) == {"boat", "train", "cow", "plane", "car", "bird"}


def test_spec_loads_a_run_directory(trained):
    out, _ = trained
    model, tokenizer = ClipSpec(TINY_CLIP, str(out)).load()
    assert not any(p.requires_grad for p in model.parameters())
    text = model.encode_text(tokenizer(["a photo of a boat."]))
    assert text.shape == (1, 128)


def test_spec_errors():
    with pytest.raises(ConfigError, match="not an open_clip model"):
        ClipSpec("no-such-clip").load()
    with pytest.raises(PromptsegError, match="cannot load"):
        ClipSpec(TINY_CLIP, "/nonexistent/clip.pt").load()


def test_interrupted_training_resumes_to_the_same_weights(tiny_world, tmp_path, monkeypatch):
    straight = train_clip(_cfg(tiny_world, tmp_path / "a"), show_progress=False)

    original = clip_mod.save_checkpoint

    def killed_after_first_checkpoint(path, state):
        original(path, state)
        if state.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(clip_mod, "save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_clip(_cfg(tiny_world, tmp_path / "b"), show_progress=False)
    monkeypatch.setattr(clip_mod, "save_checkpoint", original)
    resumed = train_clip(_cfg(tiny_world, tmp_path / "b"), resume=True, show_progress=False)

    a = torch.load(tmp_path / "a" / "clip.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "clip.pt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert resumed["clip_zero_shot_map"] == straight["clip_zero_shot_map"]


def test_resume_refuses_a_different_config(tiny_world, tmp_path):
    train_clip(_cfg(tiny_world, tmp_path), show_progress=False)
    with pytest.raises(PromptsegError, match="different config"):
        train_clip(_cfg(tiny_world, tmp_path, lr=5e-4), resume=True, show_progress=False)


def test_bad_captions_are_named(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"id": "a", "captions": ["x"]}\nnot json\n')
    with pytest.raises(DataError, match=r"captions.jsonl:2"):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"id": "a", "captions": []}\n')
    with pytest.raises(DataError, match="a has no captions"):
        read_captions(tmp_path)


def test_corpus_is_the_clip_split_when_present(tiny_world):
    corpus = pretraining_corpus(tiny_world)
    assert corpus and all(r.split == "clip" and r.id.startswith("web_") for r in corpus)


def test_object_over_context_pairs_each_object_with_its_own_context(tiny_world, trained, monkeypatch):
    from promptseg.data.voc import VOCDataset

    dataset = VOCDataset(tiny_world, "val")
    assert set(trained[1]["clip_object_over_context"]) <= set(dataset.class_names)

    fill = np.round(np.asarray(open_clip.OPENAI_DATASET_MEAN) * 255).astype(np.uint8)

    def kept(pixels):  # pixels that masking left (those of the fill colour in the image itself do not count)
        return (pixels != fill).any(-1).sum()

    def scores_by_area(model, tokenizer, images, names):  # a "CLIP" that likes whatever is bigger
        return np.repeat(np.array([kept(i) for i in images])[:, None], len(names), 1).astype(np.float32)

    monkeypatch.setattr(clip_mod, "zero_shot_scores", scores_by_area)
    expected: dict[str, list[bool]] = {}
    for sample in dataset:
        image, mask, context = sample.load_image(), sample.load_mask(), sample.load_context()
        for k in np.flatnonzero(sample.labels):
            obj, ctx = mask == k + 1, context == k + 1
            if obj.sum() >= 20 and ctx.sum() >= 20:
                expected.setdefault(dataset.class_names[k], []).append(kept(image[obj]) > kept(image[ctx]))
    shares = clip_mod.object_over_context(None, None, dataset)
    assert shares == pytest.approx({name: float(np.mean(v)) for name, v in expected.items()})
    assert set(shares) == set(expected) and len(expected) >= 3


def test_masked_to_mean_is_zero_after_clip_normalisation():
    image = np.full((4, 4, 3), 200, np.uint8)
    keep = np.zeros((4, 4), bool)
    keep[1:3, 1:3] = True
    x = clip_normalize(torch.from_numpy(masked_to_mean(image, keep)).permute(2, 0, 1)[None].float() / 255, 4)
    assert x[0, :, 1:3, 1:3].min() > 1.0  # kept pixels unchanged (200/255 is above the mean)
    outside = x[0].permute(1, 2, 0)[torch.from_numpy(~keep)]
    assert outside.abs().max() < 0.01  # masked pixels sit at CLIP's mean: what P * normalise(X) gives at P = 0

