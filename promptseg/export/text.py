"""Prompt folding: the text side of a CAM run evaluated once into constant ``C x D`` features.

Nothing on the device runs CLIP's text encoder: whatever a method learned on the text side is
computed here, L2-normalised, saved as ``text_features.npy`` and identified by its sha256.

- ``clims``: the class prompts ``class_template.format(name)``.
- ``pole``: per class the name POLE chose most often, through the learned text adaptor.
- ``semples``: the learned class-associated background prompts (stage b), recomputed through
  CLIP's text tower and checked against the tensor stage b saved.
- ``baseline`` learns no text side: no features.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..configs import from_dict
from ..errors import PromptsegError
from ..io import read_json

FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class FoldedText:
    features: np.ndarray  # C x D float32, rows L2-normalised
    class_names: tuple[str, ...]
    source: str  # what the rows are, in words

    @property
    def sha256(self) -> str:
        return text_features_sha256(self.features)


def text_features_sha256(features: np.ndarray) -> str:
    """sha256 of the features' float32 little-endian bytes (the same bytes ``text_features.npy`` holds)."""
    return hashlib.sha256(np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()


def _guidance(config: dict, run: Path):
    from ..train.config import ClipGuidance

    return from_dict(ClipGuidance, config["guidance"], where=f"{run}/config.json guidance")


@torch.no_grad()
def fold_text_features(cam_run: str | Path) -> FoldedText | None:
    """The constant text features of a ``promptseg train cam`` run, or None for the baseline."""
    from ..data.voc import VOCDataset
    from ..train.clip import ClipSpec, encode_prompts

    run = Path(cam_run)
    config = read_json(run / "config.json")
    method = config["method"]
    if method == "baseline":
        return None
    class_names = tuple(VOCDataset(config["data"], config["split"]).class_names)
    guide = _guidance(config, run)
    clip, tokenizer = ClipSpec(guide.clip_model, guide.clip_pretrained).load()
    if method == "clims":
        features = encode_prompts(clip, tokenizer, [guide.class_template.format(c) for c in class_names])
        source = f"class prompts {guide.class_template!r}"
    elif method == "pole":
        features, source = _fold_pole(run, clip, tokenizer, guide, class_names)
    elif method == "semples":
        features = _fold_semples(run, clip, tokenizer, class_names)
        source = "SemPLeS learned background prompts (stage b)"
    else:
        raise PromptsegError(f"{run}: method {method!r} has no text side promptseg can fold")
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return FoldedText(features.numpy().astype(np.float32), class_names, source)


def _fold_pole(run: Path, clip, tokenizer, guide, class_names) -> tuple[torch.Tensor, str]:
    from ..train.checkpoint import load_checkpoint
    from ..train.clip import encode_prompts
    from ..train.prompts import ClipAdapter

    choices = read_json(run / "prompt_choices.json")
    counts: dict[str, Counter] = {c: Counter() for c in class_names}
    for per_image in choices["choices"].values():
        for cls, name in per_image.items():
            counts[cls][name] += 1
    names = [counts[c].most_common(1)[0][0] if counts[c] else choices["candidates"][c][0] for c in class_names]
    raw = encode_prompts(clip, tokenizer, [guide.class_template.format(n) for n in names])
    state = load_checkpoint(run / "train_state.pt").get("extra", {})
    if "text_adaptor" not in state:
        raise PromptsegError(f"{run}/train_state.pt: no text adaptor saved (not a finished POLE run?)")
    adaptor = ClipAdapter(raw.shape[1])
    adaptor.load_state_dict(state["text_adaptor"])
    return adaptor.eval()(raw), f"POLE's most chosen names {names} through its text adaptor"


def _fold_semples(run: Path, clip, tokenizer, class_names) -> torch.Tensor:
    from ..train.checkpoint import load_checkpoint
    from ..train.methods import TEXT_FEATURES
    from ..train.prompts import BackgroundPrompts

    stage_b = run / "stage_b"
    prompts_state = load_checkpoint(stage_b / "prompts.pt")
    embeddings = prompts_state["embeddings"]
    prompts = BackgroundPrompts(clip, tokenizer, embeddings.shape[0], embeddings.shape[1])
    prompts.embeddings.data.copy_(embeddings)
    features = prompts(clip)
    saved = load_checkpoint(stage_b / TEXT_FEATURES)
    if list(saved["class_names"]) != list(class_names):
        raise PromptsegError(f"{stage_b}: prompts learned for {saved['class_names']} | expected {list(class_names)}")
    drift = float((features - saved["text_features"]).abs().max())
    if drift > FOLD_TOLERANCE:
        raise PromptsegError(f"{stage_b}: prompts recomputed through CLIP differ from {TEXT_FEATURES} by {drift:.2e} "
                             f"(> {FOLD_TOLERANCE}): the CLIP checkpoint changed since training")
    return features
