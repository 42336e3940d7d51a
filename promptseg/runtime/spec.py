"""The export spec: graph names, dtypes, shapes and the metadata every exported ONNX carries.

One definition imported by the exporter, the runtime, the calibrator and the tests, so a tensor
name cannot drift between the graph and the code that feeds it. Plain Python: no torch here.

Contract of both graphs (decided once): the input ``image`` is ``N x 3 x H x W float32``, RGB,
values 0..1. Normalisation (mean/std) and the resize to the network's own input size are folded
into the graph, and outputs come back at the input's ``H x W``. So the device only decodes,
scales to 0..1 and stacks; images of one size batch together with no host resize.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..errors import PromptsegError

DYNAMIC_DIMS = ("batch", "height", "width")

# The range of the dynamic height/width an export is traced for and a device profile covers: the
# runtime upscales smaller images and downscales larger ones into it, then resizes the labels back.
MIN_SIDE = 16
MAX_SIDE = 4096
OVERLAY_FORMATS = ("jpeg", "png")  # how `infer` writes image overlays


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. String dims are symbolic: ``batch``/``height``/``width`` are
    dynamic axes (ONNX dim_params); ``classes``/``fg_classes`` are fixed per model (its class list)."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if d in DYNAMIC_DIMS}


@dataclass(frozen=True)
class GraphSpec:
    kind: str
    filename: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` argument."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}


IMAGE = TensorSpec("image", "float32", ("batch", 3, "height", "width"))

SEGMENTER = GraphSpec(
    kind="segmenter",
    filename="segmenter.onnx",
    inputs=(IMAGE,),
    outputs=(
        # background + classes, at the input's height and width
        TensorSpec("logits", "float32", ("batch", "classes", "height", "width")),
        TensorSpec("labels", "int64", ("batch", "height", "width")),
    ),
)

CAM = GraphSpec(
    kind="cam",
    filename="cam.onnx",
    inputs=(IMAGE,),
    outputs=(
        # ReLU'd class activation maps divided by their per-image maximum (0..1), one per
        # foreground class, at the input's height and width
        TensorSpec("cams", "float32", ("batch", "fg_classes", "height", "width")),
        # sigmoid of the CAM network's pooled logits: the image-level class scores (no CLIP needed)
        TensorSpec("scores", "float32", ("batch", "fg_classes")),
    ),
)

GRAPHS = {g.kind: g for g in (SEGMENTER, CAM)}

METADATA_PREFIX = "promptseg."


@dataclass(frozen=True)
class ModelMetadata:
    """What the device needs to pre/post-process and trace a model; stored as ONNX ``metadata_props``.

    ``class_names`` are the output channels in order: for the segmenter ``background`` first, for
    the CAM graph the foreground classes only. ``mean``/``std`` are the normalisation folded into
    the graph (recorded for tracing; the runtime feeds 0..1 RGB). ``input_size`` is the ``(H, W)``
    the network runs at inside the graph, also the natural shape to batch and calibrate at.
    """

    kind: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]
    method: str
    promptseg_version: str
    text_features_sha256: str = ""  # sha256 of text_features.npy; "" when the run learned none
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.kind not in GRAPHS:
            raise PromptsegError(f"metadata kind: got {self.kind!r} | expected one of {', '.join(GRAPHS)}")
        if len(self.palette) < len(self.class_names):
            raise PromptsegError(f"metadata palette: {len(self.palette)} colours for {len(self.class_names)} classes")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise PromptsegError(f"metadata input_size: got {self.input_size} | expected (H, W) >= 1")

    def to_props(self) -> dict[str, str]:
        """``metadata_props`` entries: every value a JSON string under the ``promptseg.`` prefix."""
        self.validate()
        record = asdict(self)
        extra = record.pop("extra")
        props = {METADATA_PREFIX + key: json.dumps(value) for key, value in record.items()}
        props.update({METADATA_PREFIX + "extra." + key: value for key, value in extra.items()})
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Inverse of :meth:`to_props`; a missing key is an error that names the model."""
        values, extra = {}, {}
        for key, value in props.items():
            if not key.startswith(METADATA_PREFIX):
                continue
            name = key[len(METADATA_PREFIX):]
            if name.startswith("extra."):
                extra[name[len("extra."):]] = value
            else:
                values[name] = json.loads(value)
        required = [f for f in cls.__dataclass_fields__ if f not in ("extra", "text_features_sha256")]
        missing = [f for f in required if f not in values]
        if missing:
            raise PromptsegError(
                f"{source}: not a promptseg export (metadata lacks {', '.join(METADATA_PREFIX + m for m in missing)})"
            )
        meta = cls(
            kind=values["kind"],
            class_names=tuple(values["class_names"]),
            palette=tuple(tuple(int(c) for c in rgb) for rgb in values["palette"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            input_size=tuple(int(v) for v in values["input_size"]),
            method=values["method"],
            promptseg_version=values["promptseg_version"],
            text_features_sha256=values.get("text_features_sha256", ""),
            extra=extra,
        )
        meta.validate()
        return meta

    @property
    def graph(self) -> GraphSpec:
        return GRAPHS[self.kind]


def read_metadata(path) -> ModelMetadata:
    """The promptseg metadata of an ONNX file, read without loading the weights into memory."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise PromptsegError(f"{path}: not a readable ONNX model ({exc})") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=str(path))
