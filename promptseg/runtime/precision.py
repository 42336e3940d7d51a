"""A model's numeric precision, read from the graph itself so a bench row or an engine cache key
cannot claim a precision the file does not have."""

from __future__ import annotations

from ..errors import PromptsegError

PRECISIONS = ("fp32", "fp16", "int8")  # what a graph (or a TensorRT engine) can be
# what a backend may be asked to run at: OpenVINO adds bf16, a compute precision of the CPU, not of the graph
RUN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# Q/DQ pairs (TensorRT's explicit quantization) and ONNX Runtime's QOperator forms both mean int8.
_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                       "MatMulInteger"})


def graph_precision(model) -> str:
    """``int8`` if the ``onnx.ModelProto`` quantizes, ``fp16`` if it holds float16 weights or casts to
    float16, else ``fp32``."""
    from onnx import TensorProto

    nodes = list(model.graph.node)
    if any(n.op_type in _INT8_OPS or n.op_type.startswith("QLinear") for n in nodes):
        return "int8"
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    for node in nodes:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                return "fp16"
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                return "fp16"
    return "fp32"


def model_precision(path) -> str:
    """:func:`graph_precision` of an ONNX file (its weights are not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise PromptsegError(f"{path}: not a readable ONNX model ({exc})") from None
    return graph_precision(model)


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS, where: str = "") -> str:
    if precision not in allowed:
        raise PromptsegError(f"precision: got {precision!r} | expected one of {', '.join(allowed)}{where}")
    return precision


def precision_of(path) -> str:
    """The precision of a model file: a TensorRT engine's from its manifest, an ONNX's from its graph."""
    from pathlib import Path

    from .engine_cache import read_manifest

    path = Path(path)
    if path.suffix != ".engine":
        return model_precision(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise PromptsegError(f"{path}: no readable {path.name}.json beside it | expected an engine built by "
                             f"`promptseg build-engine`")
    return manifest["key"]["precision"]
