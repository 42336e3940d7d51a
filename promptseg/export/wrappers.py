"""Export-only modules: fold normalisation, the resize to the network's size and the resize back
into the graph, so the device feeds ``N x 3 x H x W`` RGB 0..1 and reads outputs at ``H x W``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..train.cams import IMAGENET_MEAN, IMAGENET_STD


class _Normalise(nn.Module):
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) * self.inv_std


class SegmenterForExport(nn.Module):
    """``image`` -> (``logits`` ``N x (C+1) x H x W``, ``labels`` ``N x H x W`` int64).

    Same arithmetic as :class:`promptseg.train.seg.Segmenter` on an ImageNet-normalised input.
    """

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.normalise = _Normalise()
        self.net = segmenter.net
        self.input_size = segmenter.input_size

    def forward(self, image: torch.Tensor):
        size = image.shape[-2:]
        x = F.interpolate(self.normalise(image), size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False)
        logits = F.interpolate(self.net(x)["out"], size=size, mode="bilinear", align_corners=False)
        return logits, logits.argmax(1)


class CamForExport(nn.Module):
    """``image`` -> (``cams`` ``N x C x H x W`` in 0..1, ``scores`` ``N x C``).

    Single-scale version of the training-time CAM inference: ReLU CAMs resized to the input and
    divided by their per-image maximum; scores are the sigmoid of the pooled logits. No CLIP.
    """

    def __init__(self, cam_net: nn.Module):
        super().__init__()
        self.normalise = _Normalise()
        self.cam_net = cam_net

    def forward(self, image: torch.Tensor):
        raw = self.cam_net(self.normalise(image))
        scores = torch.sigmoid(raw.mean(dim=(2, 3)))
        cams = F.interpolate(F.relu(raw), size=image.shape[-2:], mode="bilinear", align_corners=False)
        peak = cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-5)
        return cams / peak, scores
