"""One ONNX file from one export wrapper: names and dynamic axes from the spec, metadata inside,
full checker, TensorRT operator check, atomic write."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ..errors import PromptsegError
from ..io import write_bytes_atomic
from ..runtime.spec import MAX_SIDE, MIN_SIDE, GraphSpec, ModelMetadata
from .trt_ops import TENSORRT_MAX_OPSET, unsupported_ops

OPSET = 18  # torch's exporter emits 18 natively (>= 17: LayerNormalization maps to TensorRT's layer)


def export_onnx(module: torch.nn.Module, spec: GraphSpec, metadata: ModelMetadata, example: torch.Tensor,
                path: str | Path) -> onnx.ModelProto:
    """Export ``module`` (eval mode) to ``path`` as ``spec`` says; returns the written model."""
    from torch.export import Dim

    if metadata.kind != spec.kind:
        raise PromptsegError(f"metadata kind {metadata.kind!r} | expected {spec.kind!r}")
    dims = {"batch": Dim("batch", min=1, max=1024), "height": Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            "width": Dim("width", min=MIN_SIDE, max=MAX_SIDE)}
    dynamic = {t.name: {axis: dims[name] for axis, name in t.dynamic_axes.items()} for t in spec.inputs}
    module = module.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        tmp_path = Path(tmp) / spec.filename
        torch.onnx.export(module, (example,), str(tmp_path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_shapes=dynamic, opset_version=OPSET,
                          dynamo=True, external_data=False, verbose=False)
        model = onnx.load(str(tmp_path))
    _check_names(model, spec)
    del model.metadata_props[:]
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"promptseg {metadata.kind} ({metadata.method}); input image N x 3 x H x W float32 RGB 0..1"
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not 17 <= opset <= TENSORRT_MAX_OPSET:
        raise PromptsegError(f"{spec.filename}: opset {opset} | expected 17..{TENSORRT_MAX_OPSET} for TensorRT")
    bad = unsupported_ops(model)
    if bad:
        raise PromptsegError(f"{spec.filename}: ops TensorRT's ONNX parser lacks: {', '.join(bad)}")
    onnx.checker.check_model(model, full_check=True)
    write_bytes_atomic(path, model.SerializeToString())
    return model


def _check_names(model: onnx.ModelProto, spec: GraphSpec) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise PromptsegError(f"{spec.filename}: graph names {inputs} -> {outputs} | "
                             f"expected {spec.input_names} -> {spec.output_names}")
