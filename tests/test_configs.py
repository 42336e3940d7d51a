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
    assert cfg.net.arch == "resnet50" and cfg.net.output_stride == 16 and cfg.crop == 512
    if cfg.method != "baseline":
        assert cfg.guidance.clip_model == "ViT-B-32" and cfg.guidance.clip_pretrained == "openai"
        assert len(cfg.guidance.class_words) == 20 and "player" in cfg.guidance.class_words
        assert isinstance(cfg.guidance.background_words, tuple)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"config.net: unknown keys \['depth'\]"):
        from_dict(CamTrainConfig, {"data": "d", "out": "o", "net": {"depth": 3}})
    with pytest.raises(ConfigError, match="method"):
        from_dict(CamTrainConfig, {"data": "d", "out": "o", "method": "magic"}).validate()
