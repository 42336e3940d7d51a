from __future__ import annotations

from pathlib import Path

import pytest

from promptseg.configs import from_dict, load_config
from promptseg.errors import ConfigError
from promptseg.train.config import CamTrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("voc_*.json"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "candidates" not in p.name], ids=lambda p: p.name)
def test_paper_configs_load_and_validate(path):
    cfg = load_config(CamTrainConfig, path)
    assert cfg.net.arch == "resnet50" and cfg.net.output_stride == 16
    assert cfg.crop == (224 if cfg.method == "semples" else 512)  # SemPLeS: WeakTr's input size
    if cfg.method != "baseline":
        assert cfg.guidance.clip_model == "ViT-B-32" and cfg.guidance.clip_pretrained == "openai"
        assert len(cfg.guidance.class_words) == 20 and "player" in cfg.guidance.class_words
        assert isinstance(cfg.guidance.background_words, tuple)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"config.net: unknown keys \['depth'\]"):
        from_dict(CamTrainConfig, {"data": "d", "out": "o", "net": {"depth": 3}})
    with pytest.raises(ConfigError, match="method"):
        from_dict(CamTrainConfig, {"data": "d", "out": "o", "method": "magic"}).validate()


def test_the_semples_config_trains_with_the_references_budgets():
    """main1/main3 (stages a, c): batch 64, 60 epochs, lr 5.12e-4 x batch / 512, AdamW wd 0.03 in one group,
    timm cosine per epoch, RandAugment crops; main2 (b): batch 128, 60 epochs, lr 0.1 x batch / 512, plain crops."""
    cfg = load_config(CamTrainConfig, CONFIGS[0].with_name("voc_semples.json"))
    assert (cfg.split, cfg.batch_size, cfg.epochs, cfg.optimizer) == ("train_aug", 64, 60, "adamw")
    assert cfg.lr == pytest.approx(5.12e-4 * cfg.batch_size / 512, rel=1e-12)
    assert [cfg.procedure(k) for k in ("classifier_lr_mult", "weight_decay", "schedule", "augment")] == \
        [1.0, 0.03, "cosine_epoch", "randaugment"]
    guide = cfg.guidance
    assert (guide.prompt_batch_size, guide.prompt_epochs, guide.prompt_schedule, guide.prompt_augment) == \
        (128, 60, "cosine_epoch", "resized_crop")
    assert guide.prompt_lr == pytest.approx(0.1 * guide.prompt_batch_size / 512, rel=1e-12)


def test_the_code_defaults_are_each_methods_reference_procedure():
    clims, semples = (CamTrainConfig(data="d", out="o", method=m) for m in ("clims", "semples_a"))
    assert [clims.procedure(k) for k in ("classifier_lr_mult", "weight_decay", "schedule", "augment")] == \
        [10.0, 1e-4, "poly", "scale_crop"]
    assert [semples.procedure(k) for k in ("classifier_lr_mult", "weight_decay", "schedule", "augment")] == \
        [1.0, 0.03, "cosine_epoch", "randaugment"]
    assert CamTrainConfig(data="d", out="o", method="semples", schedule="poly").procedure("schedule") == "poly"
    with pytest.raises(ConfigError, match=r"schedule: got 'step' \| expected one of poly, cosine_step"):
        CamTrainConfig(data="d", out="o", schedule="step").validate()
