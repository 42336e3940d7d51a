"""What each CLIP-guided method does to the CAMs, with stub CLIPs whose answers are known.

The stub CLIP's image embedding is the mean colour (R, B) of the view as CLIP sees it (its input
normalisation undone), so "looks like the class" means "is red". On an image whose object is red
and whose context is blue, CLIMS's losses must push the CAM up on the object and down on the
context; SemPLeS's refinement must push it down where the view looks like the learned background;
POLE must pick, per class, the candidate name closest to the CAM-masked image.
"""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from promptseg.train.cams import IMAGENET_MEAN, IMAGENET_STD
from promptseg.train.config import default_guidance
from promptseg.train.methods import ClipGuidedTrainer, SemplesRefineTrainer, select_prompts

SIZE = 16
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)  # how the CAM methods' views are normalised (as the references)
OPENAI = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)  # POLE's selection: CLIP's preprocess


class ColourClip:
    """encode_image: the view's mean colour on ``channels``, its input normalisation undone."""

    def __init__(self, channels=(0, 2), normalisation=IMAGENET):
        self.channels = list(channels)
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation)
        self.visual = types.SimpleNamespace(image_size=SIZE)

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        rgb = views * self.std + self.mean
        return rgb.mean(dim=(2, 3))[:, self.channels]


def _red_object_on_blue() -> tuple[torch.Tensor, torch.Tensor]:
    """``1 x 3 x 16 x 16`` RGB 0..1: left half red (the object), right half blue (its context)."""
    image = torch.zeros(1, 3, SIZE, SIZE)
    image[0, 0, :, : SIZE // 2] = 1.0
    image[0, 2, :, SIZE // 2:] = 1.0
    on_object = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    on_object[:, : SIZE // 2] = True
    return image, on_object


def _trainer(cls, method: str, **guide):
    """A trainer of ``cls`` around the stub CLIP, without data, network or CLIP files."""
    trainer = cls.__new__(cls)
    trainer.guide = replace(default_guidance(method), **guide)
    trainer.clip, trainer.clip_size = ColourClip(), SIZE
    trainer.class_text = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)  # "red"
    trainer.background_text = F.normalize(torch.tensor([[0.0, 1.0]]), dim=-1)  # "blue"
    trainer.cbs_threshold = 0.3
    return trainer


def _cam_gradient(trainer, terms: tuple[str, ...], cams: torch.Tensor | None = None) -> torch.Tensor:
    image, _ = _red_object_on_blue()
    cams = torch.zeros(1, 1, SIZE, SIZE) if cams is None else cams
    cams.requires_grad_(True)
    losses = trainer.method_loss(image, cams, torch.ones(1, 1), torch.zeros(1, dtype=torch.long))
    assert set(terms) <= set(losses)
    sum(losses[name] for name in terms).backward()
    return cams.grad[0, 0]


@pytest.mark.parametrize("terms", [("otm",), ("btm",), ("otm", "btm")])
def test_clims_matching_raises_the_cam_on_the_object_and_lowers_it_on_the_context(terms):
    trainer = _trainer(ClipGuidedTrainer, "clims", w_cbs=0.0, w_reg=0.0)
    grad = _cam_gradient(trainer, terms)
    _, on_object = _red_object_on_blue()
    assert (grad[on_object] < 0).all(), "a descent step must raise the CAM on the object"
    assert (grad[~on_object] > 0).all(), "a descent step must lower the CAM on the context"


def test_clims_background_suppression_lowers_the_cam_on_the_named_background():
    trainer = _trainer(ClipGuidedTrainer, "clims", w_otm=0.0, w_btm=0.0, w_cbs=1.0, w_reg=0.0)
    grad = _cam_gradient(trainer, ("cbs",))
    _, on_object = _red_object_on_blue()
    assert grad[~on_object].mean() > 0 and grad[~on_object].mean() > grad[on_object].mean()


def test_clims_area_regularisation_lowers_the_cam_everywhere():
    trainer = _trainer(ClipGuidedTrainer, "clims", w_otm=0.0, w_btm=0.0, w_cbs=0.0, w_reg=1.0)
    assert (_cam_gradient(trainer, ("reg",)) > 0).all()


def test_semples_refinement_moves_the_mask_off_the_learned_background():
    trainer = _trainer(SemplesRefineTrainer, "semples", w_refine=1.0)
    trainer.prompt_text = F.normalize(torch.tensor([[0.0, 1.0]]), dim=-1)  # the learned background: blue
    _, on_object = _red_object_on_blue()
    cams = torch.where(on_object, 1.0, 0.5)[None, None].clone()  # S leaks half onto the context
    grad = _cam_gradient(trainer, ("refine",), cams)
    assert grad[~on_object].mean() > 0, "the refinement must lower the mask where the view looks like blue"
    assert grad[~on_object].mean() > grad[on_object].mean()
    # and with the object's own colour as the "background", it would push the other way: the sign is the prompt's
    trainer.prompt_text = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    assert _cam_gradient(trainer, ("refine",), cams)[on_object].mean() > 0


class _ColourCams(torch.nn.Module):
    """A CAM network whose class k map is the ImageNet-normalised input's channel k (flip-equivariant)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return images[:, : self.num_classes]


class _ColourWords:
    """Tokenizer + text tower: a prompt's colour word becomes a one-hot (R, G, B) embedding."""

    WORDS = ("red", "green", "blue")

    def __call__(self, prompts):
        return torch.tensor([next(i for i, w in enumerate(self.WORDS) if w in p) for p in prompts])

    @staticmethod
    def encode_text(tokens):
        return F.one_hot(tokens, 3).float()


def _two_colour_dataset(tmp_path, sizes=((SIZE, SIZE),)):
    """One image per size: left half red (class "a"), right half green (class "b")."""
    from PIL import Image

    samples = []
    for i, (height, width) in enumerate(sizes):
        image = np.zeros((height, width, 3), np.uint8)
        image[:, : width // 2, 0] = 255
        image[:, width // 2:, 1] = 255
        path = tmp_path / f"img{i}.png"
        Image.fromarray(image).save(path)
        samples.append(types.SimpleNamespace(id=f"img{i}", labels=np.array([1, 1]), image_path=path,
                                             load_image=lambda image=image: image))
    return type("Data", (), {"class_names": ("a", "b"), "__iter__": lambda self: iter(samples)})()


def test_pole_picks_the_candidate_closest_to_the_cam_masked_image(tmp_path):
    dataset = _two_colour_dataset(tmp_path, sizes=((SIZE, SIZE), (12, 20)))  # mixed sizes, as real VOC
    clip = ColourClip(channels=(0, 1, 2), normalisation=OPENAI)
    clip.encode_text = _ColourWords.encode_text
    names = ["blue one", "red one", "green one"]  # canonical first, and never the answer
    choices = select_prompts(_ColourCams(2), clip, _ColourWords(), dataset, {"a": names, "b": names}, "{}")
    assert choices == {f"img{i}": {"a": "red one", "b": "green one"} for i in range(2)}
