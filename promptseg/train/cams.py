"""From a CAM network to class maps, pseudo-masks and their scores.

CAM inference follows CLIMS: ReLU CAMs at several scales with horizontal flips, resized to the
image, summed, divided by the per-class maximum, and kept for the image's labelled classes only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.palette import IGNORE_INDEX
from ..eval import ConfusionMatrix, ContextLeak
from ..runtime.processing import mask_from_peak
from .hardware import Throughput, autocast, count_flops, to_memory_format

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIMS_BACKGROUND_THRESHOLD = 0.15  # fixed in advance by the reference; not tuned on our labels


def imagenet_normalise(images01: torch.Tensor) -> torch.Tensor:
    """``B x 3 x H x W`` RGB 0..1 -> ImageNet-normalised input of the CAM network."""
    mean = images01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


@torch.inference_mode()
def infer_cams(net, images_u8: np.ndarray, labels: np.ndarray, scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
               flip: bool = True, *, channels_last: bool = True, amp_dtype: torch.dtype | None = None,
               throughput: Throughput | None = None) -> np.ndarray:
    """Multi-scale, flipped CAMs of a batch of same-size images.

    ``images_u8``: ``B x H x W x 3`` uint8 RGB; ``labels``: ``B x C`` multi-hot. Returns
    ``B x C x H x W`` float32 in 0..1, zero for classes an image is not labelled with. The network
    runs on NHWC inputs (``channels_last``) and under ``amp_dtype`` autocast when given; maps are
    summed in fp32. ``throughput`` gets the images and FLOPs of the pass.
    """
    device = next(net.parameters()).device
    images = torch.from_numpy(np.array(images_u8, dtype=np.float32)).to(device).permute(0, 3, 1, 2) / 255.0
    images = imagenet_normalise(images)
    batch, _, height, width = images.shape
    total = torch.zeros(batch, net.num_classes, height, width, device=device)
    for scale in scales:
        size = (max(int(round(height * scale)), 8), max(int(round(width * scale)), 8))
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else images
        scaled = to_memory_format(torch.cat([scaled, scaled.flip(-1)]) if flip else scaled, channels_last)
        with autocast(device, amp_dtype):
            if throughput is not None:
                raw, flops = count_flops(lambda x=scaled: net(x))
                throughput.add(0, flops)
            else:
                raw = net(scaled)
        cams = F.relu(raw.float())
        if flip:
            cams = cams[:batch] + cams[batch:].flip(-1)
        total += F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)
    if throughput is not None:
        throughput.add(batch, 0)
    total[~torch.from_numpy(np.asarray(labels) > 0).to(device)] = 0
    peak = total.flatten(2).amax(2).clamp_min(1e-5)[..., None, None]
    return (total / peak).cpu().numpy()


CAM_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))


class CamScores:
    """CAM scores accumulated image by image: mIoU at ``threshold``, at ``extra_thresholds`` and at
    every ``oracle_thresholds``, and the context leak at ``threshold``.

    The best threshold on the same ground truth is reported apart as ``oracle_*``: it looked at
    the labels it is scored on, so it is not a result.
    """

    def __init__(self, num_classes: int, threshold: float = CLIMS_BACKGROUND_THRESHOLD,
                 extra_thresholds: Sequence[float] = (), oracle_thresholds: Sequence[float] = CAM_THRESHOLDS):
        self.threshold = float(threshold)
        self.extra_thresholds = tuple(map(float, extra_thresholds))
        self.thresholds = sorted({self.threshold, *self.extra_thresholds, *map(float, oracle_thresholds)})
        self.matrices = {t: ConfusionMatrix(num_classes + 1) for t in self.thresholds}
        self.leak = ContextLeak(num_classes)
        self.have_context = True

    def update(self, cams: np.ndarray, gt: np.ndarray, context: np.ndarray | None) -> None:
        peak, ids = cams.max(0), (cams.argmax(0) + 1).astype(np.uint8)
        for t in self.thresholds:
            pred = mask_from_peak(peak, ids, t)  # cams_to_mask(cams, t) with the argmax done once
            self.matrices[t].update(pred, gt)
            if t == self.threshold:
                if context is None:
                    self.have_context = False
                else:
                    self.leak.update(np.where(gt == IGNORE_INDEX, IGNORE_INDEX, pred), context)

    def report(self) -> dict:
        at = self.matrices[self.threshold]
        best = max(self.thresholds, key=lambda t: self.matrices[t].miou())
        report = {
            "background_threshold": self.threshold,
            "cam_miou": 100 * at.miou(),
            "cam_per_class_iou": [None if np.isnan(v) else 100 * float(v) for v in at.iou()],
            "context_leak": float(self.leak.overall()) if self.have_context else None,
            "context_leak_per_class": [None if np.isnan(v) else float(v) for v in self.leak.per_class()]
            if self.have_context else None,
            "oracle_cam_miou": 100 * self.matrices[best].miou(),
            "oracle_background_threshold": best,
        }
        for t in self.extra_thresholds:
            report[f"cam_miou_at_{t:g}"] = 100 * self.matrices[t].miou()
        return report


def score_cams(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], num_classes: int,
               threshold: float = CLIMS_BACKGROUND_THRESHOLD, extra_thresholds: Sequence[float] = (),
               oracle_thresholds: Sequence[float] = CAM_THRESHOLDS) -> dict:
    """:class:`CamScores` over ``items``, which yields ``(cams, gt_mask, context_mask_or_None)``."""
    scores = CamScores(num_classes, threshold, extra_thresholds, oracle_thresholds)
    for cams, gt, context in items:
        scores.update(cams, gt, context)
    return scores.report()
