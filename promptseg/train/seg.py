"""The edge segmenter: a torchvision MobileNetV3 network trained on pseudo-masks (or, as the
reference point, on ground truth), scored on the val split's ground truth.

The network runs at ``input_size`` (images are resized to it) and its logits are resized back to
the image, the same contract the exported graph keeps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.cache import DecodedCache
from ..data.images import load_mask
from ..data.palette import IGNORE_INDEX
from ..data.voc import VOCDataset
from ..errors import ConfigError, DataError, PromptsegError
from ..eval import ConfusionMatrix
from ..io import atomic_write, read_json, write_json_atomic
from .cams import imagenet_normalise
from .checkpoint import capture_rng, check_resume_config, config_record, load_checkpoint, restore_rng, save_checkpoint
from .hardware import (
    Throughput,
    autocast,
    count_flops,
    precision_facts,
    resolve_amp,
    resolve_channels_last,
    to_memory_format,
)

SEG_ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


@dataclass(frozen=True)
class SegTrainConfig:
    data: str
    out: str
    masks: str | None = None  # pseudo-mask folder (<id>.png); None = the dataset's ground truth
    arch: str = "lraspp_mobilenet_v3_large"
    input_size: int = 128
    split: str = "train"
    val_split: str = "val"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-3  # from scratch; measured on the world: GT-trained val mIoU 75.5 at 64 px
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    amp: bool | None = None  # bf16 autocast; None: where the CPU has bf16 units (hardware.py)
    channels_last: bool | None = None  # NHWC; None: on

    def validate(self) -> None:
        if self.arch not in SEG_ARCHS:
            raise ConfigError(f"arch: got {self.arch!r} | expected one of {', '.join(SEG_ARCHS)}")
        if self.input_size < 32 or self.input_size % 16:
            raise ConfigError(f"input_size: got {self.input_size} | expected a multiple of 16, >= 32")
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)} | expected >= 1")


class Segmenter(nn.Module):
    """``B x 3 x H x W`` ImageNet-normalised RGB -> logits ``B x (C+1) x H x W`` (resized back)."""

    def __init__(self, arch: str, num_classes: int, input_size: int):
        super().__init__()
        builder = getattr(torchvision.models.segmentation, arch)
        self.net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        logits = self.net(x)["out"]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegCrops(Dataset):
    """Images with their training masks, flipped at random: ``3 x H x W`` 0..1 and ``H x W`` int64."""

    def __init__(self, dataset: VOCDataset, masks: str | None, train: bool):
        self.dataset, self.masks, self.train = dataset, Path(masks) if masks else None, train
        self.decoded = DecodedCache()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        image = self.decoded.get(("image", index), sample.load_image)
        if self.masks is None:
            mask = self.decoded.get(("mask", index), sample.load_mask)
        else:
            mask = self.decoded.get(("mask", index), lambda: load_mask(self.masks / f"{sample.id}.png"))
            if mask.shape != image.shape[:2]:
                raise DataError(f"{self.masks / (sample.id + '.png')}: mask {mask.shape} | image {image.shape[:2]}")
        x = torch.tensor(image).permute(2, 0, 1).float() / 255.0
        y = torch.from_numpy(mask.astype(np.int64))
        if self.train and random.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def _cosine(base: float, step: int, total: int) -> float:
    return float(0.5 * base * (1 + np.cos(np.pi * step / total)))  # a float: checkpoints load weights_only


def train_segmenter(cfg: SegTrainConfig, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train, evaluate on val, write ``segmenter.pt``, ``report.json``, ``config.json``, ``val.png``."""
    from tqdm import tqdm

    from .cam_train import seed_everything

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_set, val_set = VOCDataset(cfg.data, cfg.split), VOCDataset(cfg.data, cfg.val_split)
    if cfg.masks is not None and not Path(cfg.masks).is_dir():
        raise DataError(f"{cfg.masks}: pseudo-mask folder not found")
    model = Segmenter(cfg.arch, train_set.num_classes, cfg.input_size)
    device = torch.device("cpu")
    amp_dtype, channels_last = resolve_amp(cfg.amp, device), resolve_channels_last(cfg.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(SegCrops(train_set, cfg.masks, train=True), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=len(train_set) > cfg.batch_size, generator=generator)
    total = cfg.epochs * len(loader)
    state_path = out / "train_state.pt"
    start_epoch = 0
    if resume and state_path.exists():
        state = load_checkpoint(state_path)
        check_resume_config(state, cfg, state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state, generator)
        start_epoch = state["epoch"]
    write_json_atomic(out / "config.json", cfg)
    started = time.perf_counter()
    throughput, step_flops = Throughput(), None
    throughput.start()
    bar = tqdm(total=total, initial=start_epoch * len(loader), desc="train segmenter", disable=not show_progress)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = _cosine(cfg.lr, epoch * len(loader) + i, total)

            x = to_memory_format(x, channels_last)

            def forward_backward(x=x, y=y):
                with autocast(device, amp_dtype):
                    logits = model(imagenet_normalise(x))
                loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
                if not torch.isfinite(loss):
                    raise PromptsegError(f"segmenter loss became {loss.item()}: lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                return loss

            if step_flops is None:  # the first step of a session is counted, later ones estimated from it
                loss, step_flops = count_flops(forward_backward)
            else:
                loss = forward_backward()
            throughput.add(len(x), step_flops)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        save_checkpoint(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     **capture_rng(generator), "epoch": epoch + 1, "config": config_record(cfg)})
    bar.close()
    throughput.stop()
    save_checkpoint(out / "segmenter.pt", {"model": model.state_dict(), "arch": cfg.arch,
                                           "input_size": cfg.input_size,
                                           "class_names": list(train_set.class_names)})
    model = model.to(memory_format=torch.contiguous_format)  # the saved weights load into any layout
    scores = evaluate_segmenter(model.eval(), val_set, channels_last=channels_last)
    _save_val_pictures(model, val_set, out / "val.png")
    # the pseudo-masks' lineage (method, CAM and pseudo-mask scores) travels into this run's report
    source = Path(cfg.masks) / "report.json" if cfg.masks else None
    lineage = {}
    if source is not None and source.is_file():
        lineage = {k: v for k, v in read_json(source).items()
                   if k in ("method", "cam_miou", "pseudo_mask_miou", "pseudo_mask_context_leak")}
    report = {"method": "ground truth" if cfg.masks is None else lineage.pop("method", None), **lineage,
              "seed": cfg.seed, "trained_on": "ground truth" if cfg.masks is None else str(cfg.masks),
              "train_seconds_this_session": round(time.perf_counter() - started, 1),
              **precision_facts(amp_dtype, channels_last), "train_throughput": throughput.report(),
              "seg_val_miou": scores["miou"], "seg_val_per_class_iou": scores["per_class_iou"]}
    write_json_atomic(out / "report.json", report)
    return report


@torch.inference_mode()
def evaluate_segmenter(model: Segmenter, dataset: VOCDataset, batch_size: int = 64,
                       channels_last: bool = True) -> dict:
    """mIoU (0..100) of the argmax labels against the dataset's ground truth (fp32)."""
    from .cam_train import same_size_chunks

    matrix = ConfusionMatrix(dataset.num_classes + 1)
    for chunk in same_size_chunks(dataset, batch_size):
        x = torch.from_numpy(np.stack([s.load_image() for s in chunk])).permute(0, 3, 1, 2).float() / 255.0
        labels = model(to_memory_format(imagenet_normalise(x), channels_last)).argmax(1).numpy()
        for sample, pred in zip(chunk, labels, strict=True):
            matrix.update(pred, sample.load_mask())
    summary = matrix.summary(("background", *dataset.class_names), percent=True)
    return {"miou": summary["miou"], "per_class_iou": summary["per_class_iou"]}


@torch.inference_mode()
def _save_val_pictures(model: Segmenter, dataset: VOCDataset, path: Path, count: int = 8) -> None:
    from ..visualize import gallery, overlay_mask

    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = np.stack([s.load_image() for s in samples])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    preds = model.eval()(imagenet_normalise(x)).argmax(1).numpy().astype(np.uint8)
    rows = []
    for image, sample, pred in zip(images, samples, preds, strict=True):
        gt = sample.load_mask()
        rows.append([image, overlay_mask(image, np.where(gt == IGNORE_INDEX, 0, gt)), overlay_mask(image, pred)])
    picture = gallery(rows)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


