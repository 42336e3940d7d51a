"""Typed configuration of the CAM stages: filled by the CLI, saved beside every run."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .cam_net import CamNetConfig
from .clip import TINY_CLIP

OPTIMIZERS = ("sgd", "adamw")
METHODS = ("baseline", "clims", "pole", "semples", "semples_a", "semples_c")  # semples = stages a, b, c
# poly: base (1 - step / steps) ** 0.9 before every step (the CLIMS code's PolyOptimizer); cosine_step: half a
# cosine over the steps; cosine_epoch: timm's CosineLRScheduler as SemPLeS's main1/2/3 step it (once per epoch)
SCHEDULES = ("poly", "cosine_step", "cosine_epoch")
# scale_crop: CLIMS's random rescale, crop and flip; randaugment: SemPLeS (a)/(c)'s timm transform
# (RandomResizedCrop, flip, RandAugment, random erasing); resized_crop: its stage (b)'s (crop and flip only)
AUGMENTS = ("scale_crop", "randaugment", "resized_crop")
# What each method's reference trains with where a CamTrainConfig field is None: the CLIMS code's
# (baseline, CLIMS, POLE) and SemPLeS's main1/main3 (its stages a and c: one AdamW group)
REFERENCE_PROCEDURES = {
    "clims": {"classifier_lr_mult": 10.0, "weight_decay": 1e-4, "schedule": "poly", "augment": "scale_crop"},
    "semples": {"classifier_lr_mult": 1.0, "weight_decay": 0.03, "schedule": "cosine_epoch", "augment": "randaugment"},
}

POLE_SELECTION_SCALES = (1.0, 0.5, 1.5, 2.0)  # POLE masks with make_cam's CAM: these scales, flipped
# The words the references put in "a photo of {}." for VOC's classes (CLIMS's clip_utils, POLE, SemPLeS)
VOC_CLIP_WORDS = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "player", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
CLIMS_BACKGROUND_WORDS = ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks")


@dataclass(frozen=True)
class ClipGuidance:
    """Everything the CLIP-guided methods add to a CAM run (METHODS.md defaults for VOC)."""

    clip_model: str = TINY_CLIP
    clip_pretrained: str | None = None
    init_from: str | None = None  # baseline run directory or cam_net.pt to start the CAM network from
    class_words: tuple[str, ...] | None = None  # prompt words per class; None = the class names
    class_template: str = "a photo of {}."  # the references' wording; a tiny CLIP wants its captions' style
    background_template: str = "a photo of {}."
    w_otm: float = 10.0
    w_btm: float = 24.0
    w_cbs: float = 1.0
    w_reg: float = 0.2
    # L_CBS threshold: 0.26 was tuned on OpenAI CLIP's cosine scale. None = the `cbs_quantile` of
    # this CLIP's similarities between training images and the background prompts (recorded).
    cbs_threshold: float | None = 0.26
    cbs_quantile: float = 0.75
    background_words: tuple[str, ...] = CLIMS_BACKGROUND_WORDS
    # POLE
    candidates: str | None = None  # JSON {class: [names...]}; None = classes.json "synonyms"
    selection_scales: tuple[float, ...] = POLE_SELECTION_SCALES
    adaptor_lr_mult: float = 1.0
    # SemPLeS: its generator's backbone is effectively frozen (detached); the CLIP losses train the head
    train_backbone: bool = True
    prompt_length: int = 30
    w_prompt_text: float = 0.02
    w_refine: float = 0.05
    # stage (b): the reference's main2 (60 epochs, batch 128, lr 0.1 x batch / 512, AdamW wd 0.03)
    prompt_epochs: int = 60
    prompt_lr: float = 0.025  # 0.1 x 128 / 512, as the reference scales it
    prompt_batch_size: int | None = None  # None: the CAM stages' batch_size
    prompt_schedule: str = "cosine_epoch"
    prompt_augment: str = "resized_crop"
    prompts_from: str | None = None  # stage (c): the stage (b) run holding text_features.pt



@dataclass(frozen=True)
class CamTrainConfig:
    """One CAM training run; saved as ``config.json`` beside its outputs."""

    data: str
    out: str
    method: str = "baseline"
    net: CamNetConfig = field(default_factory=CamNetConfig)
    split: str = "train"
    val_split: str | None = "val"  # held-out split that picks the CAM background threshold
    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    # SGD only. The references' PolyOptimizer(SGD) passes its weight decay into SGD's momentum slot, so
    # their published runs used momentum 1e-4 (decay set per group): that effective value is the default
    momentum: float = 1e-4
    # None: the method's reference (REFERENCE_PROCEDURES), read through `procedure(name)`
    classifier_lr_mult: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None  # one of SCHEDULES
    augment: str | None = None  # one of AUGMENTS; `scale_range` is scale_crop's
    # ResNet conv1/bn1 frozen, as every reference CAM network (resnet50_cam, resnet50_clims)
    freeze_stem: bool = True
    # batch norm on running statistics (FixedBatchNorm, the reference baseline's) or on batch statistics
    # (the CLIMS/POLE network's resnet50_v2, "not fix bn"); None: fixed for the baseline only
    fixed_bn: bool | None = None
    crop: int = 64
    scale_range: tuple[float, float] = (0.8, 1.25)
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # cpu, cuda or auto; under torchrun each process takes its LOCAL_RANK GPU
    amp: bool | None = None  # bf16 autocast (fp16 on GPUs without bf16); None: where the hardware has bf16
    channels_last: bool | None = None  # NHWC; None: on
    guidance: ClipGuidance | None = None  # the CLIP-guided methods' settings

    @property
    def uses_fixed_bn(self) -> bool:
        return self.method == "baseline" if self.fixed_bn is None else self.fixed_bn

    def procedure(self, name: str):
        """Field ``name`` of REFERENCE_PROCEDURES as this run trains it: its own value, or its method's reference."""
        value = getattr(self, name)
        reference = REFERENCE_PROCEDURES["semples" if self.method.startswith("semples") else "clims"]
        return reference[name] if value is None else value

    def validate(self) -> None:
        self.net.validate()
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: got {self.optimizer!r} | expected one of {OPTIMIZERS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: got {self.device!r} | expected auto, cpu or cuda")
        for name in ("epochs", "batch_size", "crop", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)} | expected >= 1")
        if self.method not in METHODS:
            raise ConfigError(f"method: got {self.method!r} | expected one of {', '.join(METHODS)}")
        _check_choice("schedule", self.procedure("schedule"), SCHEDULES)
        _check_choice("augment", self.procedure("augment"), AUGMENTS)
        if self.guidance is not None:
            _check_choice("guidance.prompt_schedule", self.guidance.prompt_schedule, SCHEDULES)
            _check_choice("guidance.prompt_augment", self.guidance.prompt_augment, AUGMENTS)
            if self.guidance.prompt_batch_size is not None and self.guidance.prompt_batch_size < 1:
                raise ConfigError(f"guidance.prompt_batch_size: got {self.guidance.prompt_batch_size} | expected >= 1")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"scale_range: got {self.scale_range} | expected 0 < low <= high")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: got {value!r} | expected one of {', '.join(choices)}")


# Tiny-CLIP settings that differ from the reference's (tuned for OpenAI CLIP), measured on the
# world: the tiny CLIP learned captions phrased "a photo of a boat." / "a photo of the water.";
# L_CBS's threshold comes from this CLIP's similarities; SemPLeS's text push 0.2 (not 0.02) and 4
# prompt epochs moved the learned prompts away from the class text (cos 0.44 -> -0.06 for 'boat')
# and lifted CAM mIoU 37.0 -> 38.5.
TINY_CLIP_WORDS = {"class_template": "a photo of a {}.", "background_template": "a photo of the {}."}
TINY_CLIP_SETTINGS = {"clims": {"cbs_threshold": None}, "pole": {"cbs_threshold": None},
                      "semples": {"w_prompt_text": 0.2, "prompt_epochs": 4}}


def default_guidance(method: str, **overrides) -> ClipGuidance:
    """METHODS.md's loss weights for each method (VOC values), or with the tiny CLIP (the default
    ``clip_model``) its wording and settings; ``overrides`` on top."""
    per_method = {
        "clims": {},
        "pole": {"w_btm": 25.0, "w_reg": 0.0},
        "semples": {"w_otm": 1.0, "w_btm": 2.4, "w_cbs": 0.0, "w_reg": 0.0, "train_backbone": False},
    }
    if method not in per_method:
        raise ConfigError(f"method: got {method!r} | expected one of {', '.join(per_method)}")
    tiny = overrides.get("clip_model", TINY_CLIP) == TINY_CLIP
    tiny_settings = {**TINY_CLIP_WORDS, **TINY_CLIP_SETTINGS[method]} if tiny else {}
    return ClipGuidance(**{**per_method[method], **tiny_settings, **overrides})
