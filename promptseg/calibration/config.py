"""Options of ``promptseg calibrate``: enums and one frozen dataclass, validated before any work."""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..runtime.spec import MAX_SIDE, MIN_SIDE


class Method(str, enum.Enum):
    """How activation ranges are taken from the calibration images."""

    MINMAX = "minmax"  # observed min/max: with symmetric int8 this is TensorRT's "max" calibration
    ENTROPY = "entropy"  # KL-divergence threshold (TensorRT's entropy calibrator)
    PERCENTILE = "percentile"  # clip the histogram tails at ``percentile``


class Target(str, enum.Enum):
    """Who runs the INT8 model."""

    TENSORRT = "tensorrt"  # explicit-quantization QDQ ONNX that TensorRT builds INT8 engines from
    CPU = "cpu"  # whatever runs fastest on this CPU: ONNX Runtime's provider (OpenVINO too when installed)


@dataclass(frozen=True)
class CpuCandidate:
    """One way of running the model on this CPU.

    ``format``: ``fp32`` (the model as exported), ``qoperator`` (QLinearConv & co., ONNX Runtime
    only), ``qdq`` (QuantizeLinear/DequantizeLinear pairs that the runtime fuses) or ``nncf`` (NNCF's
    QDQ model). ``activation``: ``u8`` (asymmetric uint8) or ``s8`` (symmetric int8); weights are
    always symmetric per-channel int8. ``ops``: ``all`` (every op type ONNX Runtime can quantize) or
    ``conv`` (Conv/MatMul/Gemm only, everything between them stays float). ``backend`` runs it,
    at ``precision`` (OpenVINO's ``bf16``; None: the graph's).
    """

    name: str
    format: str
    activation: str | None = None
    ops: str | None = None
    backend: str = "onnxruntime"
    precision: str | None = None

    @property
    def is_fp32(self) -> bool:
        return self.format == "fp32"

    @property
    def is_reference(self) -> bool:
        """FP32 on ONNX Runtime: what every other candidate is gated and timed against."""
        return self.name == "fp32"


ONNXRUNTIME_CANDIDATES: tuple[CpuCandidate, ...] = (
    CpuCandidate("fp32", "fp32"),
    *(CpuCandidate(f"{short}-{act}-{ops}", fmt, act, ops)
      for fmt, short in (("qoperator", "qop"), ("qdq", "qdq"))
      for act in ("u8", "s8")
      for ops in ("all", "conv")),
)
# OpenVINO on the same FP32 ONNX (bf16 where the CPU has it), on ONNX Runtime's QDQ models and on NNCF's
OPENVINO_CANDIDATES: tuple[CpuCandidate, ...] = (
    CpuCandidate("openvino-fp32", "fp32", backend="openvino"),
    CpuCandidate("openvino-bf16", "fp32", backend="openvino", precision="bf16"),
    *(CpuCandidate(f"openvino-qdq-{act}-all", "qdq", act, "all", backend="openvino") for act in ("u8", "s8")),
    *(CpuCandidate(f"nncf-{act}", "nncf", act, backend="openvino") for act in ("u8", "s8")),
)
CPU_CANDIDATES = ONNXRUNTIME_CANDIDATES + OPENVINO_CANDIDATES
CPU_CANDIDATE_NAMES: tuple[str, ...] = tuple(c.name for c in CPU_CANDIDATES)


def openvino_installed() -> bool:
    """Whether the ``[openvino]`` extra (OpenVINO and NNCF) is importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything one calibration run needs.

    Calibration images come from ``data`` (a VOC-layout root, split ``split``) or from ``images``
    (a folder of image files). The accuracy gate runs on held-out images: ``data``'s
    ``gate_split`` when ``data`` is given (ground-truth masks, real mIoU), otherwise the images of
    ``images`` not used for calibration (no masks: INT8 is scored against the FP32 labels). When
    the calibration and gate splits are the same, the split is divided deterministically.
    """

    model: str
    out: str
    data: str | None = None
    images: str | None = None
    split: str = "train"
    gate_split: str = "val"
    num: int = 256  # calibration images
    gate_num: int = 500  # at most this many held-out images for the gate
    method: Method = Method.MINMAX
    percentile: float = 99.999  # for Method.PERCENTILE
    target: Target = Target.TENSORRT
    max_drop: float = 1.0  # mIoU points INT8 may lose against FP32
    # without ground truth, also this share of the pixels either model calls foreground must keep its label
    min_foreground_agreement: float = 0.9
    threads: int = 2  # ONNX Runtime intra-op threads for calibration, the gate and the latency
    batch: int = 16  # images per inference batch (same-size images only)
    max_side: int = 1024  # the runtime's host resize: longer side at most this (aspect kept)
    latency_batch: int = 8  # batch the CPU candidates are timed (and chosen) at
    latency_runs: int = 20  # timed runs per candidate (median reported)
    min_speedup: float = 1.05  # an INT8 CPU model must beat FP32 by this factor to replace it
    cpu_candidates: tuple[str, ...] = field(default=CPU_CANDIDATE_NAMES)
    keep_float: tuple[str, ...] = ()  # layers (node names) pinned to float by hand
    # TensorRT target: when plain INT8 fails the gate, equalise, give sensitive tensors a better range,
    # then keep the fewest sensitive layers float, until it passes
    repair: bool = True
    cam_threshold: float | None = None  # CAM graph: background below this peak; None: the model's metadata
    image_counts: tuple[int, ...] = (16, 64, 256)  # the gate's drop with this many calibration images (<= num)
    proxy_images: int = 8  # calibration images the per-layer sensitivity proxy runs on
    shortlist: int = 5  # the most sensitive layers (by the proxy) the real gate measures
    max_float: int = 8  # most layers the repair may keep in float

    def __post_init__(self) -> None:
        # accept the CLI's strings; an unknown value is an error here, before anything runs
        for name, enum_type in (("method", Method), ("target", Target)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                choices = ", ".join(m.value for m in enum_type)
                raise ConfigError(f"{name}: got {value!r} | expected one of {choices}") from None
        for name in ("cpu_candidates", "keep_float", "image_counts"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Check values and paths; raise :class:`ConfigError` naming the option."""
        if not self.data and not self.images:
            raise ConfigError("calibration images: got neither data nor images | expected --data DIR or --images DIR")
        if not Path(self.model).is_file():
            raise ConfigError(f"model: {self.model} not found | expected an exported .onnx file")
        for name in ("data", "images"):
            value = getattr(self, name)
            if value and not Path(value).is_dir():
                raise ConfigError(f"{name}: {value} is not a directory")
        for name in ("num", "gate_num", "threads", "batch", "latency_batch", "latency_runs", "proxy_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)} | expected >= 1")
        for name in ("shortlist", "max_float"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)} | expected >= 0")
        if any(n < 1 for n in self.image_counts):
            raise ConfigError(f"image_counts: got {list(self.image_counts)} | expected counts >= 1")
        if self.cam_threshold is not None and not 0.0 < self.cam_threshold < 1.0:
            raise ConfigError(f"cam_threshold: got {self.cam_threshold} | expected in (0, 1) (CAMs are 0..1)")
        if not MIN_SIDE <= self.max_side <= MAX_SIDE:
            raise ConfigError(f"max_side: got {self.max_side} | expected {MIN_SIDE}..{MAX_SIDE} (the graph's sides)")
        if not self.max_drop >= 0:
            raise ConfigError(f"max_drop: got {self.max_drop} | expected >= 0 mIoU points")
        if not 0.0 <= self.min_foreground_agreement <= 1.0:
            raise ConfigError(f"min_foreground_agreement: got {self.min_foreground_agreement} | expected 0..1")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile: got {self.percentile} | expected in (50, 100]")
        if not self.min_speedup >= 1.0:
            raise ConfigError(f"min_speedup: got {self.min_speedup} | expected >= 1.0")
        unknown = [c for c in self.cpu_candidates if c not in CPU_CANDIDATE_NAMES]
        if unknown or not self.cpu_candidates:
            raise ConfigError(f"cpu_candidates: got {list(self.cpu_candidates)} | expected a non-empty subset of "
                              f"{', '.join(CPU_CANDIDATE_NAMES)}")
        asked = [c.name for c in OPENVINO_CANDIDATES if c.name in self.cpu_candidates]
        if asked and self.cpu_candidates != CPU_CANDIDATE_NAMES and not openvino_installed():
            raise ConfigError(f"cpu_candidates: {', '.join(asked)} need openvino and nncf | `pip install "
                              f"promptseg[openvino]`")

    @property
    def candidates(self) -> tuple[CpuCandidate, ...]:
        """The CPU candidates to try, FP32 always among them (it is what INT8 has to beat); by default
        OpenVINO's only where it is installed."""
        wanted = set(self.cpu_candidates) | {"fp32"}
        if self.cpu_candidates == CPU_CANDIDATE_NAMES and not openvino_installed():
            wanted -= {c.name for c in OPENVINO_CANDIDATES}
        return tuple(c for c in CPU_CANDIDATES if c.name in wanted)
