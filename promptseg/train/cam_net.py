"""The CAM network: a torchvision ResNet trunk and a bias-free 1x1 classifier (as in CLIMS).

``resnet50`` with output stride 16 is the paper configuration (ImageNet weights from a local
file when given). The CPU default for the 64 px synthetic world is ``resnet18`` cut after its
third stage at output stride 8: an 8 x 8 CAM for a 64 px image, at a cost two cores can train.
Its stand-in for ImageNet weights is a CAM run on the world's web split (``cam_net.pt``): the
trunk of such a run can initialise another network of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from ..errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
HEADS = ("1x1", "3x3")


@dataclass(frozen=True)
class CamNetConfig:
    arch: str = "resnet18"
    stages: int = 3  # residual stages kept (layer1..layerN); 4 = the whole trunk
    output_stride: int = 8  # 4, 8, 16 or 32: stages past it run at stride 1 (no dilation, as CLIMS)
    pretrained: str | None = None  # local torchvision state dict, or a CAM run's cam_net.pt (trunk only)
    # the classifier: "1x1" (CLIMS's bias-free 1x1 convolution) or "3x3" (a 3x3 convolution, the kind of
    # head SemPLeS trains on its generator's frozen features)
    head: str = "1x1"

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: got {self.arch!r} | expected one of {', '.join(ARCHS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head: got {self.head!r} | expected one of {', '.join(HEADS)}")
        if self.stages not in (2, 3, 4):
            raise ConfigError(f"stages: got {self.stages} | expected 2, 3 or 4")
        max_stride = 4 * 2 ** (self.stages - 1)
        if self.output_stride not in (4, 8, 16, 32) or self.output_stride > max_stride:
            raise ConfigError(f"output_stride: got {self.output_stride} | expected 4..{max_stride} "
                              f"(a power of 2) for {self.stages} stages")


class CamNet(nn.Module):
    """``B x 3 x H x W`` normalised RGB -> class activation maps ``B x C x H/os x W/os``."""

    def __init__(self, cfg: CamNetConfig, num_classes: int):
        super().__init__()
        cfg.validate()
        resnet = getattr(torchvision.models, cfg.arch)(weights=None)
        state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True) if cfg.pretrained else None
        if state is not None and "net" not in state:  # torchvision's layout (ImageNet weights)
            resnet.load_state_dict(state)
        layers = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4][: cfg.stages]
        stride = 4
        for layer in layers[1:]:
            if stride >= cfg.output_stride:
                _unstride(layer)
            else:
                stride *= 2
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.trunk = nn.Sequential(*layers)
        channels = layers[-1][-1].conv3.out_channels if hasattr(layers[-1][-1], "conv3") \
            else layers[-1][-1].conv2.out_channels
        kernel = 3 if cfg.head == "3x3" else 1
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=kernel, padding=kernel // 2, bias=False)
        self.output_stride = cfg.output_stride
        self.num_classes = num_classes
        if state is not None and "net" in state:
            self._load_trunk(state["net"], cfg.pretrained)

    def _load_trunk(self, weights: dict, source: str) -> None:
        """Stem and trunk from another CAM network's weights; the classifier stays new."""
        trunk = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}
        if trunk.keys() != own.keys() or any(trunk[k].shape != own[k].shape for k in own):
            raise ConfigError(f"net.pretrained {source}: a CAM network of another shape (arch/stages) "
                              f"than this {type(self).__name__}")
        self.load_state_dict(trunk, strict=False)

    def load_cam_weights(self, weights: dict) -> None:
        """Another CAM network's weights; a 1x1 classifier loads into a 3x3 head as its centre tap (zeros
        around it), so the head starts from exactly that network's CAMs with 9x the capacity to move them."""
        weights = dict(weights)
        theirs, ours = weights.get("classifier.weight"), self.classifier.weight
        if theirs is not None and theirs.shape[-1] == 1 and ours.shape[-1] == 3 and theirs.shape[:2] == ours.shape[:2]:
            centred = torch.zeros_like(ours)
            centred[..., 1, 1] = theirs[..., 0, 0]
            weights["classifier.weight"] = centred
        self.load_state_dict(weights)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps (no ReLU): the classifier applied at every position."""
        return self.classifier(self.features(images))

    @staticmethod
    def logits(cams: torch.Tensor) -> torch.Tensor:
        """Image-level logits = global average of the CAMs (a 1x1 conv commutes with GAP)."""
        return cams.mean(dim=(2, 3))

    def param_groups(self, freeze_stem: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, classifier) parameters: the references train the classifier at 10x lr; with
        ``freeze_stem`` the backbone's leaves out conv1/bn1, which the references freeze."""
        stem = [] if freeze_stem else list(self.stem.parameters())
        return stem + list(self.trunk.parameters()), list(self.classifier.parameters())

    def stem_parameters(self) -> list[nn.Parameter]:
        return list(self.stem.parameters())

    def fix_batch_norm(self) -> None:
        """Every batch norm on its running statistics (the references' FixedBatchNorm); affine weights still learn."""
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _unstride(layer: nn.Sequential) -> None:
    """Set the stride of a residual stage's first block (and its shortcut) to 1."""
    block = layer[0]
    for conv in (getattr(block, "conv1", None), getattr(block, "conv2", None)):
        if conv is not None and conv.stride == (2, 2):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)

