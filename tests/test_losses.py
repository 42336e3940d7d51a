"""Each loss against a value computed by hand from 2-D unit vectors."""

from __future__ import annotations

import math

import pytest
import torch

from promptseg.train import losses


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def rows(*vectors: list[float]) -> torch.Tensor:
    """Double precision: hand values next to the 0.9999 clamp cancel badly in float32."""
    return torch.tensor(list(vectors), dtype=torch.float64)


FG = rows(unit(0), unit(60))  # two (image, class) rows
TEXT = rows(unit(0), unit(0))  # s = 1 -> clamped 0.9999, and cos 60 = 0.5


def test_similarity_clamps():
    s = losses.similarity(rows(unit(0), unit(90), unit(180)), rows(*[unit(0)] * 3))
    torch.testing.assert_close(s, torch.tensor([0.9999, 1e-4, 1e-4], dtype=torch.float64))


def test_object_text_matching():
    expected = -(math.log(0.9999) + math.log(0.5)) / 2
    assert losses.object_text_matching(FG, TEXT).item() == pytest.approx(expected, rel=1e-5)


def test_background_text_matching():
    expected = -(math.log(1 - 0.9999) + math.log(1 - 0.5)) / 2
    assert losses.background_text_matching(FG, TEXT).item() == pytest.approx(expected, rel=1e-5)


def test_class_background_suppression_sums_only_firing_pairs():
    backgrounds = rows(unit(30), unit(90))
    # sims: row0 -> cos30=0.866, cos90=0 ; row1 -> cos30=0.866, cos30=0.866
    c30 = math.cos(math.radians(30))
    expected = -3 * math.log(1 - c30)  # three pairs above 0.26, summed
    value = losses.class_background_suppression(FG, backgrounds, threshold=0.26)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert losses.class_background_suppression(FG, backgrounds, threshold=0.9).item() == 0.0


def test_area_regularisation():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    assert losses.area_regularisation(maps).item() == pytest.approx(0.5)


def test_prompt_contrast():
    bg = rows(unit(0))
    prompt = rows(unit(60))
    text = rows(unit(90))  # s(t, p) = cos 30
    expected = -math.log(0.5) + 0.02 * math.log(math.cos(math.radians(30)))
    assert losses.prompt_contrast(bg, prompt, text, 0.02).item() == pytest.approx(expected, rel=1e-5)


def test_prompt_guided_suppression():
    fg = rows(unit(0), unit(90))
    prompt = rows(unit(60), unit(60))  # s = 0.5 and cos 30
    expected = -(math.log(0.5) + math.log(1 - math.cos(math.radians(30)))) / 2
    assert losses.prompt_guided_suppression(fg, prompt).item() == pytest.approx(expected, rel=1e-5)


def test_losses_give_gradients_to_the_image_side():
    fg = rows(unit(20)).requires_grad_()
    losses.object_text_matching(fg, rows(unit(0))).backward()
    assert fg.grad is not None and fg.grad.abs().sum() > 0
