"""promptseg against independent transcriptions of what the reference code computes (docs/fidelity.md).

Each transcription below is written from reading the reference, in its own order of operations
(normalise the crop, then resize; loop over images and classes; SGD's update by hand), and fed the
same tensors as promptseg's code; they must agree to a relative 1e-5.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptseg.configs import load_config
from promptseg.data.voc import VOC_CLASSES, VOCDataset
from promptseg.train import methods
from promptseg.train.cam_net import CamNet, CamNetConfig
from promptseg.train.cam_train import CamCrops, CamTrainer, scheduled_lr, semples_transform
from promptseg.train.cams import IMAGENET_MEAN, IMAGENET_STD
from promptseg.train.config import CamTrainConfig, default_guidance
from promptseg.train.methods import ClipGuidedTrainer, SemplesRefineTrainer, SemplesSegmentLabelTrainer

CLIP_SIZE = 24
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
SEMPLES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "voc_semples.json"


def _imagenet(x01: torch.Tensor) -> torch.Tensor:
    """The references' data loader: (x - mean) / std on the crop, at the crop's own size."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _resize_ac(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def _bare(cls, method: str):
    """A trainer of ``cls`` with only what its view-building reads (no data, network or CLIP files)."""
    trainer = cls.__new__(cls)
    trainer.guide, trainer.clip_size = default_guidance(method), CLIP_SIZE
    return trainer


def _batch(seed: int = 0, crop: int = 20):
    generator = torch.Generator().manual_seed(seed)
    images01 = torch.rand(2, 3, crop, crop, generator=generator)
    cams = 3 * torch.randn(2, 3, 5, 5, generator=generator)  # signed, as a CAM network's raw output
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    return images01, cams, labels


def _clims_reference_views(images01, cams, labels):
    """CLIMS's train_clims: sigmoid CAM; CAM and the ImageNet-normalised crop each resized to CLIP's input
    with align_corners=True; fg = cam * img and bg = (1 - cam) * img per present (image, class)."""
    cam = _resize_ac(torch.sigmoid(cams), CLIP_SIZE)
    img = _resize_ac(_imagenet(images01), CLIP_SIZE)
    fg, bg = [], []
    for b in range(len(labels)):
        for k in range(labels.shape[1]):
            if labels[b, k] > 0:
                fg.append(cam[b, k] * img[b])
                bg.append((1 - cam[b, k]) * img[b])
    return torch.stack(fg), torch.stack(bg)


def _semples_reference_masks(cams, eps):
    """SemPLeS's engine: the non-negative CAM upsampled to CLIP's input (align_corners=True), then
    (x - min) / (max - min + eps) map by map."""
    cam = _resize_ac(F.relu(cams), CLIP_SIZE)
    out = torch.empty_like(cam)
    for b in range(cam.shape[0]):
        for k in range(cam.shape[1]):
            low, high = cam[b, k].min(), cam[b, k].max()
            out[b, k] = (cam[b, k] - low) / (high - low + eps)
    return out


@pytest.mark.parametrize("crop", [20, CLIP_SIZE])
def test_clims_and_pole_views_equal_the_references(crop):
    images01, cams, labels = _batch(crop=crop)
    fg, bg, b_idx, k_idx = _bare(ClipGuidedTrainer, "clims").masked_views(images01, cams, labels)
    ref_fg, ref_bg = _clims_reference_views(images01, cams, labels)
    torch.testing.assert_close(fg, ref_fg, **TOLERANCE)
    torch.testing.assert_close(bg, ref_bg, **TOLERANCE)
    assert b_idx.tolist() == [0, 0, 1] and k_idx.tolist() == [0, 2, 1]  # (image, class) pairs in the reference's order


@pytest.mark.parametrize("trainer_cls, eps", [(SemplesSegmentLabelTrainer, 0.1), (SemplesRefineTrainer, 0.1)])
def test_semples_masks_and_views_equal_the_references(trainer_cls, eps):
    images01, cams, labels = _batch(seed=1)
    trainer = _bare(trainer_cls, "semples")
    assert trainer.mask_eps == eps  # stages (a) and (c); stage (b) sets 1e-4 (next test)
    masks = _semples_reference_masks(cams, eps)
    torch.testing.assert_close(trainer.clip_maps(cams), masks, **TOLERANCE)
    fg, bg, _, _ = trainer.masked_views(images01, cams, labels)
    img = _resize_ac(_imagenet(images01), CLIP_SIZE)
    torch.testing.assert_close(fg, torch.stack([masks[0, 0] * img[0], masks[0, 2] * img[0], masks[1, 1] * img[1]]),
                               **TOLERANCE)
    torch.testing.assert_close(bg, torch.stack([(1 - masks[0, 0]) * img[0], (1 - masks[0, 2]) * img[0],
                                                (1 - masks[1, 1]) * img[1]]), **TOLERANCE)
    assert float(trainer.clip_maps(cams).min()) == 0.0  # background gets no mask (the signed CAM's min-max would)


def test_semples_stage_b_masks_use_its_epsilon():
    _, cams, _ = _batch(seed=2)
    torch.testing.assert_close(methods.semples_masks(cams, CLIP_SIZE, 1e-4), _semples_reference_masks(cams, 1e-4),
                               **TOLERANCE)
    source = methods.learn_background_prompts.__code__.co_consts  # the stage sets its own epsilon
    assert 1e-4 in source


def test_sgd_steps_equal_the_references_poly_optimizer():
    """The references' PolyOptimizer(SGD) hands weight decay to SGD's momentum slot: momentum 1e-4, decay
    1e-4 per group, lr x (1 - step / max_step) ** 0.9 before each step; classifier at 10x lr."""
    torch.manual_seed(0)
    trainer = CamTrainer.__new__(CamTrainer)
    trainer.cfg = CamTrainConfig(data="", out="", optimizer="sgd", lr=0.1, weight_decay=1e-4)
    trainer.net = CamNet(CamNetConfig(stages=2, output_stride=8), 2)
    optimizer = trainer._optimizer()
    assert [(g["momentum"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == \
        [(1e-4, 1e-4, 0.1), (1e-4, 1e-4, 1.0)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    base_lrs = [g["lr"] for g in optimizer.param_groups for _ in g["params"]]
    expected = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    total = 4
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr("poly", group["base_lr"], step, 1, total)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):  # SGD by hand: d = g + wd p; v = mu v + d (v = d at the first step)
            d = g + 1e-4 * expected[i]
            velocity[i] = d if step == 0 else 1e-4 * velocity[i] + d
            expected[i] = expected[i] - base_lrs[i] * (1 - step / total) ** 0.9 * velocity[i]
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, **TOLERANCE)


def test_pole_selects_with_the_multi_scale_flipped_cam(monkeypatch, tmp_path):
    from test_method_behaviour import OPENAI, ColourClip, _ColourCams, _ColourWords, _two_colour_dataset

    seen = []
    real = methods.infer_cams

    def spy(net, images, labels, scales=(1.0,), flip=True, **kwargs):
        seen.append((tuple(scales), flip))
        return real(net, images, labels, scales, flip, **kwargs)

    monkeypatch.setattr(methods, "infer_cams", spy)
    clip = ColourClip(channels=(0, 1, 2), normalisation=OPENAI)
    clip.encode_text = _ColourWords.encode_text
    names = ["blue one", "red one", "green one"]
    methods.select_prompts(_ColourCams(2), clip, _ColourWords(), _two_colour_dataset(tmp_path),
                           {"a": names, "b": names}, "{}")
    assert seen == [((1.0, 0.5, 1.5, 2.0), True)]  # make_cam's scales, each with its flip
    assert default_guidance("pole").selection_scales == (1.0, 0.5, 1.5, 2.0)


def test_voc_prompts_use_the_references_words():
    words = methods.default_class_words(VOC_CLASSES)
    assert words[VOC_CLASSES.index("person")] == "player"
    assert {words[VOC_CLASSES.index(c)] for c in ("diningtable", "pottedplant", "tvmonitor")} == \
        {"dining table", "potted plant", "tv monitor"}
    assert methods.default_class_words(("boat", "cow")) == ("boat", "cow")  # other data: its own names


def test_cbs_threshold_is_calibrated_on_views_of_mixed_sizes():
    trainer = _bare(ClipGuidedTrainer, "clims")
    sizes = [(20, 30, 3), (16, 16, 3), (40, 24, 3)]
    rng = np.random.default_rng(0)
    trainer.dataset = [type("S", (), {"load_image": lambda self, s=s: rng.integers(0, 256, s, dtype=np.uint8)})()
                       for s in sizes]
    seen = []

    class Clip:
        def encode_image(self, views):
            seen.append(views.shape)
            return views.mean(dim=(2, 3))

    trainer.clip, trainer.background_text = Clip(), F.normalize(torch.ones(2, 3), dim=-1)
    threshold = trainer._calibrate_cbs_threshold()
    assert seen == [(3, 3, CLIP_SIZE, CLIP_SIZE)] and -1.0 <= threshold <= 1.0


@pytest.mark.parametrize("fixed_bn", [None, False])
def test_the_stem_stays_frozen_and_the_baselines_batch_norm_fixed(tiny_world, tmp_path, fixed_bn):
    """resnet50_cam (baseline): conv1/bn1 frozen, FixedBatchNorm; resnet50_clims: conv1/bn1 frozen, batch statistics."""
    cfg = CamTrainConfig(data=str(tiny_world), out=str(tmp_path), epochs=1, batch_size=16, cam_scales=(1.0,),
                         val_split=None, threads=1, fixed_bn=fixed_bn)
    trainer = CamTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.train(show_progress=False)
    after = trainer.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert not {k for k in changed if k.startswith("stem.") and not k.endswith(stats)}, "conv1/bn1 must not learn"
    assert "trunk.0.0.conv1.weight" in changed and "classifier.weight" in changed
    assert "trunk.0.0.bn1.weight" in changed  # BN's affine weights learn either way
    running = {k for k in changed if k.endswith(stats)}
    assert (not running) if cfg.uses_fixed_bn else running  # FixedBatchNorm keeps the backbone's statistics
    assert cfg.uses_fixed_bn is (fixed_bn is None)


def test_a_3x3_head_starts_from_the_generators_cams():
    torch.manual_seed(0)
    generator = CamNet(CamNetConfig(), 3).eval()
    refined = CamNet(CamNetConfig(head="3x3"), 3).eval()
    refined.load_cam_weights(generator.state_dict())
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(refined(x), generator(x), rtol=1e-5, atol=1e-5)
    assert refined.classifier.weight.shape[-2:] == (3, 3) and refined.classifier.weight.numel() == \
        9 * generator.classifier.weight.numel()


# ----------------------------------------------------------------------------- SemPLeS's budgets (row 9)


def _semples_reference_lrs(base: float, epochs: int, steps_per_epoch: int) -> list[float]:
    """main1/2/3: timm's create_scheduler for --sched cosine (t_initial = epochs, lr_min 0, warmup 0 from
    1e-6, one cycle) on a fresh optimizer at ``base``; each epoch trains, then ``lr_scheduler.step(epoch)``."""
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=0.0, warmup_lr_init=1e-6, warmup_t=0,
                                  cycle_mul=1.0, cycle_decay=0.1, cycle_limit=1, k_decay=1.0, noise_range_t=None)
    lrs = []
    for epoch in range(epochs):
        lrs += [optimizer.param_groups[0]["lr"]] * steps_per_epoch  # train_one_epoch never touches the lr
        scheduler.step(epoch)
    return lrs


@pytest.mark.parametrize("epochs", [4, 60])
def test_cosine_epoch_is_timms_scheduler_stepped_as_semples_steps_it(epochs):
    base, per_epoch = 5.12e-4 * 64 / 512, 3
    expected = _semples_reference_lrs(base, epochs, per_epoch)
    ours = [scheduled_lr("cosine_epoch", base, step, per_epoch, epochs) for step in range(epochs * per_epoch)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert ours[per_epoch] == base and ours[-1] > 0  # epoch 1 repeats epoch 0's rate; the last is not 0


def test_the_training_loop_sets_the_configured_schedule_before_every_step(tiny_world, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    monkeypatch.setattr(CamTrainer, "evaluate", lambda self, **_: {"background_threshold": 0.15})  # not under test
    monkeypatch.setattr(CamTrainer, "save_pictures", lambda self, threshold: None)
    cfg = CamTrainConfig(data=str(tiny_world), out=str(tmp_path), epochs=3, batch_size=32, lr=2e-4, crop=32,
                         val_split=None, threads=1, schedule="cosine_epoch", classifier_lr_mult=1.0)
    report = CamTrainer(cfg).train(show_progress=False)
    assert report["procedure"] == {"classifier_lr_mult": 1.0, "weight_decay": 1e-4, "schedule": "cosine_epoch",
                                   "augment": "scale_crop"}  # what ran: given values, the rest the baseline's
    per_epoch = len(VOCDataset(tiny_world, "train")) // 32
    expected = _semples_reference_lrs(2e-4, 3, per_epoch)
    np.testing.assert_allclose(np.array(seen), np.array([expected, expected]).T, rtol=1e-12)  # trunk, classifier


def test_semples_optimiser_steps_equal_the_references_adamw():
    """main1/main3: timm's create_optimizer gets ``model.parameters()`` (an iterable, so no bias/norm
    split): one torch AdamW, lr 5.12e-4 x batch / 512, wd 0.03, timm's eps 1e-8, betas (0.9, 0.999);
    only the head after the detached backbone gets gradients. AdamW written out by hand."""
    torch.manual_seed(0)
    cfg = replace(load_config(CamTrainConfig, SEMPLES_CONFIG), net=CamNetConfig(stages=2, output_stride=8, head="3x3"))
    trainer = SemplesSegmentLabelTrainer.__new__(SemplesSegmentLabelTrainer)
    trainer.cfg, trainer.guide = cfg, cfg.guidance
    trainer.net = CamNet(cfg.net, 3)
    optimizer = trainer._optimizer()
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(trainer.net.classifier.weight)]
    assert (group["weight_decay"], group["betas"], group["eps"], group["amsgrad"]) == (0.03, (0.9, 0.999), 1e-8, False)
    head = trainer.net.classifier.weight
    expected, m, v = head.detach().clone(), torch.zeros_like(head), torch.zeros_like(head)
    epochs, per_epoch = 3, 2
    lrs = _semples_reference_lrs(5.12e-4 * cfg.batch_size / 512, epochs, per_epoch)
    for step in range(epochs * per_epoch):
        grad = torch.randn_like(head)
        group["lr"] = scheduled_lr(cfg.procedure("schedule"), group["base_lr"], step, per_epoch, epochs)
        head.grad = grad.clone()
        optimizer.step()
        lr, t = lrs[step], step + 1  # AdamW: decoupled decay, then the bias-corrected Adam step
        expected = expected * (1 - lr * 0.03)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        expected = expected - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    torch.testing.assert_close(head.detach(), expected, **TOLERANCE)


def _semples_reference_transform(input_size: int, stage: str):
    """SemPLeS's datasets.build_transform(is_train=True) with main1's (stages a, c) or main2's (b) argparse
    defaults: colour jitter 0.4 / 0.0, --aa rand-m9-mstd0.5-inc1 / None, bicubic, --reprob 0.25 / 0.0,
    --remode pixel, --recount 1 / 0."""
    from timm.data import create_transform

    heavy = stage != "b"
    return create_transform(input_size=input_size, is_training=True, color_jitter=0.4 if heavy else 0.0,
                            auto_augment="rand-m9-mstd0.5-inc1" if heavy else None, interpolation="bicubic",
                            re_prob=0.25 if heavy else 0.0, re_mode="pixel", re_count=1 if heavy else 0)


INCREASING_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                  "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]  # timm 0.5.4 _RAND_INCREASING_TRANSFORMS


def test_semples_crops_have_the_references_augmentation_parameters():
    """timm 0.5.4's transforms_imagenet_train with those arguments: RandomResizedCrop (scale 0.08-1, ratio
    3/4-4/3, bicubic), flip 0.5, RandAugment (2 ops of the 15 increasing ones, each p 0.5, magnitude 9 with
    std 0.5; colour jitter unused), ToTensor, ImageNet normalisation, random erasing (p 0.25, area 2%-1/3,
    aspect 0.3-1/0.3, per-pixel normal fill, one box); stage (b): crop and flip only."""
    heavy = semples_transform(48, "randaugment").transforms
    assert [type(t).__name__ for t in heavy] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                 "RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]
    crop, flip, rand, _, normalise, erasing = heavy
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation.value) == ((48, 48), (0.08, 1.0), (0.75, 4 / 3),
                                                                              "bicubic")
    assert flip.p == 0.5 and rand.num_layers == 2 and rand.choice_weights is None
    assert [(op.name, op.prob, op.magnitude, op.magnitude_std) for op in rand.ops] == \
        [(name, 0.5, 9, 0.5) for name in INCREASING_OPS]
    assert normalise.mean.tolist() == pytest.approx(IMAGENET_MEAN)
    assert normalise.std.tolist() == pytest.approx(IMAGENET_STD)
    assert (erasing.probability, erasing.min_area, erasing.max_area, erasing.per_pixel, erasing.min_count,
            erasing.max_count) == (0.25, 0.02, 1 / 3, True, 1, 1)
    assert erasing.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    light = semples_transform(48, "resized_crop").transforms
    assert [type(t).__name__ for t in light] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                 "ColorJitter", "MaybeToTensor", "Normalize"]
    assert light[2].brightness is light[2].contrast is light[2].saturation is light[2].hue is None  # the identity


@pytest.mark.parametrize("magnitude, bits", [(10.0, 0), (5.0, 2), (0.0, 4)])
def test_posterize_keeps_the_references_bits_down_to_none(magnitude, bits):
    """PosterizeIncreasing keeps 4 - int(magnitude / 10 * 4) bits; the reference's Pillow masked each value
    with ~(2 ** (8 - bits) - 1) for any bit count, so 0 bits gave a black image (Pillow 13 refuses 0)."""
    from PIL import Image

    (op,) = [op for t in semples_transform(16, "randaugment").transforms for op in getattr(t, "ops", ())
             if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = image & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)
    np.testing.assert_array_equal(np.asarray(op(Image.fromarray(image))), expected)


@pytest.mark.parametrize("augment, stage", [("randaugment", "a"), ("resized_crop", "b")])
def test_semples_crops_equal_the_reference_transforms_output(tiny_world, augment, stage):
    """Same seeds, same image: the trainer's normalised crop is the reference's transform output (the
    JPEG opened as main1 opens it), random erasing's normal fill included."""
    from PIL import Image

    from promptseg.train.cams import imagenet_normalise

    dataset = VOCDataset(tiny_world, "train")
    crops = CamCrops(dataset, 48, (0.8, 1.25), augment)
    reference = _semples_reference_transform(48, stage)
    for seed in range(8):
        for rng in (random.seed, np.random.seed, torch.manual_seed):
            rng(seed)
        ours, _, _ = crops[seed]
        for rng in (random.seed, np.random.seed, torch.manual_seed):
            rng(seed)
        theirs = reference(Image.open(dataset[seed].image_path).convert("RGB"))
        torch.testing.assert_close(imagenet_normalise(ours[None])[0], theirs, rtol=1e-5, atol=1e-5)
