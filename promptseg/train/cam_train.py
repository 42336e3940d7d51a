"""CAM network training: the multilabel soft-margin baseline, then the CLIP-guided methods.

Every run directory holds ``config.json`` (the resolved dataclass), ``train_state.pt`` (written
atomically every epoch; ``resume=True`` continues from it), ``cam_net.pt`` (final weights),
``report.json`` and ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.cache import DecodedCache
from ..data.images import image_size
from ..data.voc import VOCDataset
from ..errors import ConfigError, PromptsegError
from ..io import write_json_atomic
from ..runtime.processing import cams_to_mask
from .cam_net import CamNet
from .cams import (
    CLIMS_BACKGROUND_THRESHOLD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_normalise,
    infer_cams,
    score_cams,
)
from .checkpoint import capture_rng, check_resume_config, config_record, load_checkpoint, restore_rng, save_checkpoint
from .config import REFERENCE_PROCEDURES, SCHEDULES, CamTrainConfig
from .distributed import Runtime, average_gradients, broadcast_parameters, setup
from .hardware import Throughput, count_flops, precision_facts


class CamCrops(Dataset):
    """Training crops ``3 x crop x crop`` RGB 0..1 and labels, made as ``augment`` (config.AUGMENTS) says.

    scale_crop: random rescale within ``scale_range``, flip, random crop padded with the ImageNet mean
    colour, which normalises to zero (as the CLIMS code pads). randaugment, resized_crop: SemPLeS's timm
    transforms (:func:`semples_transform`), un-normalised here so that the trainer's ImageNet
    normalisation gives back timm's tensor, random erasing's N(0, 1) fill included.
    """

    def __init__(self, dataset: VOCDataset, crop: int, scale_range: tuple[float, float], augment: str = "scale_crop"):
        self.dataset, self.crop, self.scale_range = dataset, crop, scale_range
        self.decoded = DecodedCache()
        self.transform = None if augment == "scale_crop" else semples_transform(crop, augment)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        decoded = self.decoded.get(index, sample.load_image)
        labels = torch.from_numpy(sample.labels)
        if self.transform is not None:
            from PIL import Image

            mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
            return self.transform(Image.fromarray(decoded)) * std + mean, labels, index
        image = torch.tensor(decoded).permute(2, 0, 1).float()[None] / 255.0
        scale = random.uniform(*self.scale_range)
        height, width = image.shape[-2:]
        size = (max(int(height * scale), 8), max(int(width * scale), 8))
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0]
        if random.random() < 0.5:
            image = image.flip(-1)
        canvas = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).repeat(1, self.crop, self.crop)
        top, left = random.randint(0, max(size[0] - self.crop, 0)), random.randint(0, max(size[1] - self.crop, 0))
        piece = image[:, top:top + self.crop, left:left + self.crop]
        off_y, off_x = random.randint(0, self.crop - piece.shape[1]), random.randint(0, self.crop - piece.shape[2])
        canvas[:, off_y:off_y + piece.shape[1], off_x:off_x + piece.shape[2]] = piece
        return canvas, labels, index


SEMPLES_RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # the timm RandAugment policy of SemPLeS's main1/main3


def semples_transform(crop: int, augment: str):
    """timm's ImageNet training transform called with the arguments of SemPLeS's ``build_transform``:
    RandomResizedCrop to ``crop`` (scale 0.08-1, ratio 3/4-4/3, bicubic), flip 0.5, then for
    ``randaugment`` (main1, main3) RandAugment rand-m9-mstd0.5-inc1 and, after the ImageNet
    normalisation, random erasing (p 0.25, per-pixel N(0, 1), one box); ``resized_crop`` (main2) has
    neither (its colour jitter 0 is the identity). PIL image in, ImageNet-normalised ``3 x crop x crop`` out."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    heavy = augment == "randaugment"
    transform = create_transform(input_size=crop, is_training=True, color_jitter=0.4 if heavy else 0.0,
                                 auto_augment=SEMPLES_RANDAUGMENT if heavy else None, interpolation="bicubic",
                                 re_prob=0.25 if heavy else 0.0, re_mode="pixel", re_count=1 if heavy else 0)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
    return transform


def posterize(image, bits_to_keep: int, **_):
    """RandAugment's posterize, each channel value masked to its top ``bits_to_keep`` bits as Pillow
    masks them. At magnitude 10 PosterizeIncreasing keeps 0 bits: the Pillow of the reference's
    time made that image black; Pillow 13 refuses 0 (ValueError), which timm passes on."""
    if bits_to_keep >= 8:
        return image
    mask = ~(2 ** (8 - bits_to_keep) - 1)
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def scheduled_lr(schedule: str, base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate of global step ``step`` (from 0) under ``schedule`` (config.SCHEDULES).

    cosine_epoch is timm's CosineLRScheduler (t_initial = epochs, no warmup, lr_min 0) driven as
    SemPLeS's main1/2/3 drive it: ``step(epoch)`` after each epoch gives the next epoch the cosine of
    the epoch just trained, so epochs 0 and 1 train at ``base`` and epoch e > 0 at the cosine of e - 1.
    """
    total = steps_per_epoch * epochs
    if schedule == "poly":
        return base * (1 - step / total) ** 0.9
    if schedule == "cosine_step":
        return base * 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "cosine_epoch":
        return base * 0.5 * (1 + math.cos(math.pi * max(step // steps_per_epoch - 1, 0) / epochs))
    raise ConfigError(f"schedule: got {schedule!r} | expected one of {', '.join(SCHEDULES)}")


class CamTrainer:
    """The training loop shared by every method; methods add their loss in :meth:`method_loss`."""

    def __init__(self, cfg: CamTrainConfig):
        cfg.validate()
        seed_everything(cfg.seed)  # methods draw initial weights (adaptors) while constructing
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.dataset = VOCDataset(cfg.data, cfg.split)
        self.net = CamNet(cfg.net, self.dataset.num_classes)

    # -- hooks for the CLIP-guided methods
    def method_loss(self, images01: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor,
                    rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch (``rows``: dataset indices). Baseline: multilabel soft margin."""
        return {"cls": F.multilabel_soft_margin_loss(CamNet.logits(cams), labels)}

    def extra_parameters(self) -> list[dict]:
        return []

    def trains_backbone(self) -> bool:
        """Whether the CAM network's stem and trunk learn (SemPLeS trains the head only)."""
        return True

    def run_facts(self) -> dict:
        """Method-specific facts for ``report.json`` (thresholds used, prompt choices, ...)."""
        return {}

    # -- the loop
    def _optimizer(self):
        backbone, classifier = self.net.param_groups(freeze_stem=self.cfg.freeze_stem)
        cfg = self.cfg
        groups = [{"params": backbone, "lr": cfg.lr, "base_lr": cfg.lr}] if self.trains_backbone() else []
        classifier_lr = cfg.lr * cfg.procedure("classifier_lr_mult")
        groups += [{"params": classifier, "lr": classifier_lr, "base_lr": classifier_lr}]
        groups += self.extra_parameters()
        decay = cfg.procedure("weight_decay")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=decay)

    def place(self, runtime: Runtime) -> None:
        """Move the trained network (and, in subclasses, the method's tensors) to the run's device."""
        memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
        self.net.to(runtime.device, memory_format=memory_format)

    def train(self, *, resume: bool = False, show_progress: bool = True) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        runtime = setup(cfg.device, cfg.amp, cfg.channels_last)
        if cfg.batch_size % runtime.world_size:
            raise PromptsegError(f"batch_size {cfg.batch_size} (global) does not split over "
                                 f"{runtime.world_size} processes")
        if runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed + runtime.rank)  # each process draws its own crops
        self.place(runtime)
        frozen = self.net.param_groups()[0] if not self.trains_backbone() else \
            self.net.stem_parameters() if cfg.freeze_stem else []
        for param in frozen:  # frozen before DDP wraps the network, which then ignores them
            param.requires_grad_(False)
        optimizer = self._optimizer()
        model = self.net
        if runtime.distributed:
            model = DistributedDataParallel(self.net, device_ids=[runtime.device.index]
                                            if runtime.device.type == "cuda" else None)
        generator = torch.Generator().manual_seed(cfg.seed)
        crops = CamCrops(self.dataset, cfg.crop, cfg.scale_range, cfg.procedure("augment"))
        sampler = None
        if runtime.distributed:
            sampler = DistributedSampler(crops, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=True)
        loader = DataLoader(crops, batch_size=cfg.batch_size // runtime.world_size, shuffle=sampler is None,
                            sampler=sampler, drop_last=len(self.dataset) > cfg.batch_size,
                            generator=generator if sampler is None else None, num_workers=0,
                            pin_memory=runtime.device.type == "cuda")
        total_steps = cfg.epochs * len(loader)
        schedule = cfg.procedure("schedule")
        state_path = self.out / "train_state.pt"
        start_epoch = 0
        if resume and state_path.exists():
            state = load_checkpoint(state_path)
            check_resume_config(state, cfg, state_path)
            self.net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            self.load_extra_state(state.get("extra", {}))
            if not runtime.distributed:  # one process: continue its exact random stream
                restore_rng(state, generator)
            start_epoch = state["epoch"]
        if runtime.is_main:
            write_json_atomic(self.out / "config.json", cfg)
        extra_params = [p for group in self.extra_parameters() for p in group["params"]]
        broadcast_parameters(extra_params, runtime)  # DDP does this for the network itself

        started = time.perf_counter()
        throughput, step_flops = Throughput(), None
        throughput.start()
        log_path = self.out / "log.jsonl"
        if start_epoch == 0 and log_path.exists() and runtime.is_main:
            log_path.unlink()
        bar = tqdm(total=total_steps, initial=start_epoch * len(loader), desc=f"train {cfg.method}",
                   disable=not show_progress or not runtime.is_main)
        for epoch in range(start_epoch, cfg.epochs):
            self.net.train()
            if not self.trains_backbone():  # a frozen backbone keeps its batch-norm statistics too
                self.net.stem.eval()
                self.net.trunk.eval()
            elif cfg.uses_fixed_bn:
                self.net.fix_batch_norm()
            if sampler is not None:
                sampler.set_epoch(epoch)
            sums: dict[str, float] = {}
            for i, (images01, labels, rows) in enumerate(loader):
                step = epoch * len(loader) + i
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(schedule, group["base_lr"], step, len(loader), cfg.epochs)
                images01 = runtime.images(images01)
                labels, rows = labels.to(runtime.device), rows.to(runtime.device)

                def forward_backward(images01=images01, labels=labels, rows=rows, step=step):
                    with runtime.autocast():
                        cams = model(imagenet_normalise(images01))
                        terms = self.method_loss(images01, cams, labels, rows)
                    loss = sum(terms.values()).float()
                    if not torch.isfinite(loss):
                        raise PromptsegError(f"loss became {loss.item()} at step {step}: lower the learning rate")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    return terms, loss

                if step_flops is None:  # the first step of a session is counted, later ones estimated from it
                    (terms, loss), step_flops = count_flops(forward_backward)
                else:
                    terms, loss = forward_backward()
                throughput.add(len(images01), step_flops)
                average_gradients(extra_params, runtime)
                optimizer.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if runtime.is_main:  # rank 0's terms: the others differ only in their crops
                with log_path.open("a") as fh:
                    fh.write(json.dumps({"epoch": epoch + 1, **{k: v / len(loader) for k, v in sums.items()}}) + "\n")
                save_checkpoint(state_path, {
                    "net": self.net.state_dict(), "optimizer": optimizer.state_dict(), "extra": self.extra_state(),
                    **capture_rng(generator), "epoch": epoch + 1, "config": config_record(cfg),
                })
            runtime.barrier()
        bar.close()
        throughput.stop()
        train_seconds = time.perf_counter() - started
        report: dict = {}
        if runtime.is_main:
            save_checkpoint(self.out / "cam_net.pt", {"net": self.net.state_dict(),
                                                       "num_classes": self.net.num_classes,
                                                       "class_names": list(self.dataset.class_names)})
            self.net.float()  # weights back in fp32; CAMs computed as the pseudo-mask stage computes them
            report = {"method": cfg.method, "seed": cfg.seed, "train_seconds_this_session": round(train_seconds, 1),
                      "procedure": {name: cfg.procedure(name) for name in REFERENCE_PROCEDURES["clims"]},
                      "device": str(runtime.device), "world_size": runtime.world_size,
                      **precision_facts(runtime.amp_dtype, runtime.channels_last),
                      "train_throughput": throughput.report(),
                      **self.run_facts(), **self.evaluate(show_progress=show_progress, amp_dtype=runtime.amp_dtype,
                                                          channels_last=runtime.channels_last)}
            self.save_pictures(report["background_threshold"])
            write_json_atomic(self.out / "report.json", report)
        runtime.barrier()
        return report

    def extra_state(self) -> dict:
        return {}

    def save_pictures(self, threshold: float, count: int = 8) -> None:
        """``cams.png``: image | ground truth | CAM heatmap | pseudo-mask, for the first images."""
        from ..io import atomic_write
        from ..visualize import gallery

        dataset = self.dataset
        if not dataset.has_masks:  # pictures need ground truth: the held-out split's, or none
            if not self.cfg.val_split:
                return
            dataset = VOCDataset(self.cfg.data, self.cfg.val_split)
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
        picture = gallery(_pictures(self.net.eval(), samples, threshold, self.cfg.cam_scales))
        atomic_write(self.out / "cams.png", lambda tmp: picture.save(tmp, format="PNG"))

    def load_extra_state(self, state: dict) -> None:
        """Restore method-specific state saved by :meth:`extra_state`."""

    def evaluate(self, show_progress: bool = False, batch_size: int = 64, *, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = True) -> dict:
        """CAM scores on the training split (WSSS evaluates CAMs on train).

        The CAMs are computed in the run's precision (bf16 autocast where the run trained under it), as
        the pseudo-mask stage computes them from this network, so both report the same CAM mIoU.

        The background threshold is chosen on the held-out ``val_split`` (its labels never touch
        training) and then applied to train: ``cam_miou``. The CLIMS threshold 0.15 is reported
        too, and the best threshold on train itself only as ``oracle_*``.
        """
        from tqdm import tqdm

        self.net.eval()
        scales = self.cfg.cam_scales

        def items(dataset, desc):
            for chunk in tqdm(same_size_chunks(dataset, batch_size), desc=desc, disable=not show_progress):
                images = np.stack([s.load_image() for s in chunk])
                cams = infer_cams(self.net, images, np.stack([s.labels for s in chunk]), scales,
                                  channels_last=channels_last, amp_dtype=amp_dtype)
                for sample, sample_cams in zip(chunk, cams, strict=True):
                    context = sample.load_context() if sample.context_path is not None else None
                    yield sample_cams, sample.load_mask(), context

        report: dict = {}
        threshold = CLIMS_BACKGROUND_THRESHOLD
        if self.cfg.val_split:
            held_out = VOCDataset(self.cfg.data, self.cfg.val_split)
            val = score_cams(items(held_out, "CAMs (val)"), held_out.num_classes)
            threshold = val["oracle_background_threshold"]
            report["val_cam_miou"] = val["oracle_cam_miou"]
        report["background_threshold_source"] = f"best on {self.cfg.val_split}" if self.cfg.val_split \
            else "CLIMS default"
        if not self.dataset.has_masks:  # a classification-only split (pretraining): nothing to score on it
            return {**report, "background_threshold": threshold}
        train = score_cams(items(self.dataset, "CAMs (train)"), self.dataset.num_classes, threshold=threshold,
                           extra_thresholds=(CLIMS_BACKGROUND_THRESHOLD,))
        return {**report, **train}


def _pictures(net, samples, threshold: float, scales) -> list[list[np.ndarray]]:
    """One row per image: image, ground truth, CAM heatmap (max over its classes), pseudo-mask."""
    from ..visualize import blend, heatmap, overlay_mask

    images = np.stack([s.load_image() for s in samples])
    cams = infer_cams(net, images, np.stack([s.labels for s in samples]), scales)
    rows = []
    for image, sample, sample_cams in zip(images, samples, cams, strict=True):
        gt = sample.load_mask()
        rows.append([image, overlay_mask(image, np.where(gt == 255, 0, gt)),
                     blend(image, heatmap(sample_cams.max(0)), 0.6),
                     overlay_mask(image, cams_to_mask(sample_cams, threshold))])
    return rows


def same_size_chunks(dataset: VOCDataset, batch_size: int):
    """Consecutive samples grouped while their image sizes agree (real datasets vary; worlds do not)."""
    chunk, size = [], None
    for sample in dataset:
        this = image_size(sample.image_path)  # as load_image returns it
        if chunk and (this != size or len(chunk) == batch_size):
            yield chunk
            chunk = []
        chunk.append(sample)
        size = this
    if chunk:
        yield chunk


def train_cam(cfg: CamTrainConfig, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train one CAM run of ``cfg.method`` and return its report."""
    cfg.validate()
    if cfg.method == "baseline":
        return CamTrainer(cfg).train(resume=resume, show_progress=show_progress)
    from .methods import TRAINERS, train_semples

    if cfg.method == "semples":
        return train_semples(cfg, resume=resume, show_progress=show_progress)
    return TRAINERS[cfg.method](cfg).train(resume=resume, show_progress=show_progress)


