"""CLIP through open_clip's own code path: a spec to load any CLIP, and a tiny CLIP to pretrain.

No CLIP weights can be downloaded where promptseg is built and tested, so the demo pretrains a
small CLIP (``promptseg-tiny-clip``, a model config registered with open_clip exactly like its
bundled ones) on the synthetic world's captions. Everything downstream takes a :class:`ClipSpec`,
so a user with real data passes ``ClipSpec("ViT-B-32", "openai")`` or a local checkpoint and the
same code runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ..data.images import load_rgb
from ..data.voc import VOCDataset
from ..errors import ConfigError, DataError, PromptsegError
from ..eval import average_precision
from ..io import write_json_atomic
from .checkpoint import check_resume_config, config_record, load_checkpoint, save_checkpoint

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_CLIP = "promptseg-tiny-clip"
CHECKPOINT_NAME = "clip.pt"
ZERO_SHOT_TEMPLATE = "a photo of a {}."

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to use: an open_clip model name and a pretrained tag or local checkpoint path.

    ``pretrained`` may be an open_clip tag (``openai``; needs the weights in the local cache), a
    checkpoint file, or a directory written by ``promptseg train clip`` (its ``clip.pt`` is used and
    its model config registered).
    """

    model: str = TINY_CLIP
    pretrained: str | None = None

    def resolve_checkpoint(self) -> str | None:
        if self.pretrained is None:
            return None
        path = Path(self.pretrained)
        if path.is_dir():
            for config in path.glob("*.json"):
                if config.stem == self.model:
                    open_clip.add_model_config(config)
            path = path / CHECKPOINT_NAME
            if not path.is_file():
                raise PromptsegError(f"{self.pretrained}: directory holds no {CHECKPOINT_NAME}")
            return str(path)
        return self.pretrained

    def load(self, device: str | torch.device = "cpu"):
        """Return ``(model, tokenizer)``; the model is in eval mode with frozen parameters."""
        if self.model not in open_clip.list_models():
            raise ConfigError(f"CLIP model {self.model!r} is not an open_clip model config")
        checkpoint = self.resolve_checkpoint()
        try:
            model = open_clip.create_model(self.model, pretrained=checkpoint, device=device)
        except RuntimeError as exc:  # open_clip raises RuntimeError for unknown tags / bad files
            raise PromptsegError(f"CLIP {self.model} / {self.pretrained}: cannot load ({exc})") from None
        model.eval().requires_grad_(False)
        return model, open_clip.get_tokenizer(self.model)


def clip_input_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clip_normalize(images01: torch.Tensor, size: int) -> torch.Tensor:
    """``B x 3 x H x W`` RGB in 0..1 -> CLIP's input: resized to ``size`` and mean/std normalised."""
    if images01.shape[-2:] != (size, size):
        images01 = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False)
    mean = images01.new_tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts: list[str], device="cpu") -> torch.Tensor:
    """L2-normalised text features ``len(prompts) x D``."""
    tokens = tokenizer(prompts).to(device)
    return F.normalize(model.encode_text(tokens), dim=-1)


@torch.inference_mode()
def zero_shot_scores(model, tokenizer, images_u8: np.ndarray, class_names: list[str],
                     batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of every image (``N x H x W x 3`` uint8) with ``a photo of a {class}.``."""
    text = encode_prompts(model, tokenizer, [ZERO_SHOT_TEMPLATE.format(c) for c in class_names])
    size = clip_input_size(model)
    scores = []
    for start in range(0, len(images_u8), batch_size):
        batch = torch.from_numpy(images_u8[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        feats = F.normalize(model.encode_image(clip_normalize(batch, size)), dim=-1)
        scores.append((feats @ text.T).numpy())
    return np.concatenate(scores)


def zero_shot_map(model, tokenizer, dataset: VOCDataset) -> tuple[float, dict[str, float]]:
    """Multi-label mAP of zero-shot class prompts on ``dataset`` (the tiny CLIP's quality gate)."""
    images = np.stack([s.load_image() for s in dataset])
    labels = np.stack([s.labels for s in dataset])
    scores = zero_shot_scores(model, tokenizer, images, list(dataset.class_names))
    per_class = {name: average_precision(scores[:, k], labels[:, k])
                 for k, name in enumerate(dataset.class_names)}
    return float(np.mean(list(per_class.values()))), per_class


def masked_to_mean(image_u8: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``image`` with the pixels outside ``keep`` set to CLIP's mean colour: what the CAM methods'
    ``P * normalise(X)`` shows CLIP where P is 0 (zero after normalisation is the mean colour)."""
    mean = np.round(np.asarray(open_clip.OPENAI_DATASET_MEAN) * 255).astype(np.uint8)
    return np.where(keep[..., None], image_u8, mean)


def object_over_context(model, tokenizer, dataset: VOCDataset, min_pixels: int = 20) -> dict[str, float] | None:
    """Per class, the share of (image, class) pairs where CLIP finds the object alone (image masked
    to the object) more like ``a photo of a {class}.`` than the class's context alone.

    The CLIP-guided CAM losses trust this ranking: where a CLIP prefers the context (a real CLIP
    does not prefer the sky to the plane), they pull CAMs onto it. None without context masks.
    """
    objects, contexts, classes = [], [], []
    for sample in dataset:
        if sample.context_path is None or sample.mask_path is None:
            return None
        image, mask, context = sample.load_image(), sample.load_mask(), sample.load_context()
        for k in np.flatnonzero(sample.labels):
            on_object, on_context = mask == k + 1, context == k + 1
            if on_object.sum() >= min_pixels and on_context.sum() >= min_pixels:
                objects.append(masked_to_mean(image, on_object))
                contexts.append(masked_to_mean(image, on_context))
                classes.append(k)
    if not classes:
        return None
    names, classes = list(dataset.class_names), np.asarray(classes)
    on_objects = zero_shot_scores(model, tokenizer, np.stack(objects), names)[np.arange(len(classes)), classes]
    on_contexts = zero_shot_scores(model, tokenizer, np.stack(contexts), names)[np.arange(len(classes)), classes]
    return {name: float(np.mean(on_objects[classes == k] > on_contexts[classes == k]))
            for k, name in enumerate(names) if np.any(classes == k)}


# ----------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class ClipTrainConfig:
    """Pretraining of a CLIP on ``captions.jsonl`` with the standard symmetric contrastive loss."""

    data: str
    out: str
    model: str = TINY_CLIP
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 50
    region_fraction: float = 0.75  # share of each batch drawn from region crops (when captions have regions)

    def validate(self) -> None:
        if self.model not in open_clip.list_models():
            raise ConfigError(f"model: got {self.model!r} | expected an open_clip model config name")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)} | expected >= 1")
        if self.batch_size < 2:
            raise ConfigError("batch_size: a contrastive loss needs at least 2 pairs per batch")


@dataclass(frozen=True)
class CaptionedImage:
    """One image's captions and its optional region captions (box ``[x0, y0, x1, y1)``, captions)."""

    id: str
    split: str | None
    captions: list[str]
    regions: list[tuple[tuple[int, int, int, int], list[str]]]


def read_captions(root: Path) -> list[CaptionedImage]:
    """Read ``captions.jsonl``: one JSON line per image, ``{"id", "split"?, "captions", "regions"?}``."""
    path = root / "captions.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; CLIP pretraining needs one JSON line per image "
                        '({"id": ..., "captions": [...]})')
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            regions = [(tuple(int(v) for v in r["box"]), list(r["captions"])) for r in row.get("regions", [])]
            rows.append(CaptionedImage(str(row["id"]), row.get("split"), list(row["captions"]), regions))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{line_no}: bad caption line ({exc})") from None
        if not rows[-1].captions:
            raise DataError(f"{path}:{line_no}: image {rows[-1].id} has no captions")
    return rows


def pretraining_corpus(root: Path) -> list[CaptionedImage]:
    """The rows CLIP pretrains on: the ``clip`` split (the world's stand-in for web data) when the
    file has one, else the captions of the ``train`` split's images."""
    rows = read_captions(root)
    corpus = [r for r in rows if r.split == "clip"]
    if corpus:
        return corpus
    train_ids = set(VOCDataset(root, "train").ids)
    corpus = [r for r in rows if r.id in train_ids]
    if len(corpus) < len(train_ids):
        missing = sorted(train_ids - {r.id for r in corpus})
        raise DataError(f"{root / 'captions.jsonl'}: no captions for {len(missing)} training images, "
                        f"e.g. {missing[:3]}")
    return corpus


def _pretraining_pairs(images: list[np.ndarray], captions: list[CaptionedImage], size: int):
    """Whole images and region crops (resized to ``size``) with their caption lists.

    Region captions stand in for the object-level and scene-level pairs of web-scale data: without
    them a tiny CLIP only learns whole-scene captions and scores single classes poorly.
    """
    from PIL import Image

    crops, texts = [], []
    for image, item in zip(images, captions, strict=False):
        crops.append(np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)))
        texts.append(item.captions)
        height, width = image.shape[:2]
        for (x0, y0, x1, y1), region_captions in item.regions:
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise DataError(f"region box {[x0, y0, x1, y1]} lies outside a {width}x{height} image")
            crop = Image.fromarray(image[y0:y1, x0:x1]).resize((size, size), Image.BILINEAR)
            crops.append(np.asarray(crop))
            texts.append(region_captions)
    return np.stack(crops), texts


def _lr_at(step: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def train_clip(cfg: ClipTrainConfig, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Pretrain, evaluate zero-shot mAP on val, write ``clip.pt`` + config + ``report.json``."""
    from tqdm import tqdm

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    root = Path(cfg.data)
    val_set = VOCDataset(root, "val")
    captions = pretraining_corpus(root)

    model = open_clip.create_model(cfg.model)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    size = clip_input_size(model)
    images_u8 = [load_rgb(root / "JPEGImages" / f"{item.id}.jpg") for item in captions]
    pairs, texts = _pretraining_pairs(images_u8, captions, size)
    images = torch.from_numpy(pairs).permute(0, 3, 1, 2)
    is_whole = torch.tensor([i == 0 for item in captions for i in range(1 + len(item.regions))])
    whole_idx, region_idx = torch.nonzero(is_whole).squeeze(1), torch.nonzero(~is_whole).squeeze(1)
    tokens = [tokenizer(c) for c in texts]  # per pair: n_captions x context_length
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    state_path = out / "train_state.pt"
    start_step, losses = 0, []
    if resume and state_path.exists():
        state = load_checkpoint(state_path)
        check_resume_config(state, cfg, state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step, losses = state["step"], list(state["losses"])
    write_json_atomic(out / "config.json", cfg)

    model.train()
    started = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), desc="train clip", disable=not show_progress,
               initial=start_step, total=cfg.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        n_whole = cfg.batch_size - int(cfg.batch_size * cfg.region_fraction) if len(region_idx) else cfg.batch_size
        idx = torch.cat([whole_idx[torch.randint(len(whole_idx), (n_whole,))],
                         region_idx[torch.randint(max(len(region_idx), 1), (cfg.batch_size - n_whole,))]])
        batch = images[idx].float() / 255.0
        flip = torch.rand(cfg.batch_size) < 0.5
        batch[flip] = batch[flip].flip(-1)
        pick = torch.randint(1 << 30, (cfg.batch_size,))
        text = torch.stack([tokens[i][p % len(tokens[i])] for i, p in zip(idx.tolist(), pick.tolist(), strict=False)])
        image_features = F.normalize(model.encode_image(clip_normalize(batch, size)), dim=-1)
        text_features = F.normalize(model.encode_text(text), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "rng": torch.get_rng_state(), "step": done, "losses": losses,
                                         "config": config_record(cfg)})
    train_seconds = time.perf_counter() - started

    model.eval()
    save_checkpoint(out / CHECKPOINT_NAME, {"state_dict": model.state_dict()})
    config_src = MODEL_CONFIG_DIR / f"{cfg.model}.json"
    if config_src.exists():  # travels with the weights so the checkpoint loads anywhere
        (out / config_src.name).write_text(config_src.read_text())
    report = {
        "stage": "clip",
        "model": cfg.model,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "pretraining_images": len(captions),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_seconds_this_session": round(train_seconds, 1),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        **clip_scores(model, tokenizer, val_set),
        "checkpoint": str(out / CHECKPOINT_NAME),
    }
    write_json_atomic(out / "report.json", report)
    return report


def clip_scores(model, tokenizer, val_set: VOCDataset) -> dict:
    """A CLIP's quality on a world's val split: zero-shot mAP and object-over-context shares."""
    mean_ap, per_class = zero_shot_map(model, tokenizer, val_set)
    return {"clip_zero_shot_map": mean_ap, "clip_zero_shot_ap": per_class,
            "clip_object_over_context": object_over_context(model, tokenizer, val_set)}


@dataclass(frozen=True)
class ClipEvalConfig:
    """Scoring a given CLIP (a prebuilt or downloaded one) on a world's val split."""

    data: str
    out: str
    model: str = TINY_CLIP
    pretrained: str | None = None
    threads: int = 2


def evaluate_clip(cfg: ClipEvalConfig) -> dict:
    """``out/report.json`` with :func:`clip_scores` of the CLIP ``cfg`` names."""
    torch.set_num_threads(cfg.threads)
    model, tokenizer = ClipSpec(cfg.model, cfg.pretrained).load()
    report = {"stage": "clip", "model": cfg.model, "pretrained": cfg.pretrained,
              **clip_scores(model, tokenizer, VOCDataset(cfg.data, "val"))}
    write_json_atomic(Path(cfg.out) / "report.json", report)
    return report

