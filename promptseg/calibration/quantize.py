"""INT8 models from calibrated ranges, with ONNX Runtime's quantizer (``onnxruntime.quantization``).

Why this quantizer: it ships with the ``onnxruntime`` the base install already has, its QDQ output
is what TensorRT's explicit quantization reads, and its QOperator output is what ONNX Runtime's
CPU provider runs fastest. NVIDIA's ModelOpt (``nvidia-modelopt[onnx]``) drives this very
quantizer with TensorRT-guided options, but installing it replaces ``onnxruntime`` with
``onnxruntime-gpu`` and pins an older ``onnx``, so it cannot be an optional extra without breaking
the base install. We therefore apply the same TensorRT-guided settings ourselves:

- symmetric int8 everywhere (activations per tensor, weights per output channel, axis 0 for
  Conv), so every QuantizeLinear/DequantizeLinear zero point is 0;
- Q/DQ only on the *inputs* of the ops TensorRT runs in INT8 (Conv, MatMul, Gemm, residual Add,
  pooling), never on op outputs: TensorRT fuses ``DQ -> Conv (+ bias + activation)`` and
  requantises at the next Q it finds;
- biases stay float (TensorRT folds them; an int32 DequantizeLinear is not what it expects);
- on a residual ``Add(conv_branch, shortcut)`` only the shortcut keeps its Q/DQ, so TensorRT fuses
  the add into the convolution that produces ``conv_branch``;
- the output tail (the final Add of the head, the Resizes back to the input size and the ArgMax)
  stays float: quantising the logits right before the argmax would only flip near-tied labels.

The ranges are computed once per run (:func:`compute_ranges`) and every candidate model is
quantised from that one cache, so candidates differ only in how they quantise, never in data.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PromptsegError
from .config import CpuCandidate, Method
from .images import ImageBatches, OrtReader

# op types whose inputs get Q/DQ for TensorRT (the INT8 layers it has; Add only as a residual)
TENSORRT_QUANT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool", "GlobalAveragePool",
                      "MaxPool")
CONV_LIKE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ops that may sit between the last convolution and the graph outputs (head merge, resize, argmax)
_TAIL_OPS = {"ArgMax", "Resize", "Upsample", "Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
             "Softmax", "Add", "Sub", "Mul", "Div", "Concat"}
_DATA_INPUT_ONLY = {"Resize", "Upsample", "Reshape", "Squeeze", "Unsqueeze"}  # the rest are shapes / sizes
# ONNX Runtime's QOperator forms: fine on its CPU provider, not parsed by TensorRT
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
                           "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool",
                           "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax"})
# batches per collect_data call: min/max reduces inside the graph, but the histogram calibrators hold
# every float tensor of a chunk in memory before binning it (about 1 GB per 16 images at 512x512)
CALIBRATION_CHUNK = {Method.MINMAX: 8, Method.ENTROPY: 1, Method.PERCENTILE: 1}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer prints progress and logs a pre-processing hint on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def ort_method(method: Method):
    from onnxruntime.quantization import CalibrationMethod

    return {Method.MINMAX: CalibrationMethod.MinMax, Method.ENTROPY: CalibrationMethod.Entropy,
            Method.PERCENTILE: CalibrationMethod.Percentile}[method]


# ----------------------------------------------------------------------------- ranges


@dataclass
class Ranges:
    """Per-tensor activation ranges of one calibration, as ONNX Runtime's ``TensorsData``."""

    method: Method
    tensors: object  # onnxruntime.quantization.TensorsData
    num_images: int
    num_batches: int

    def save_ort(self, path: Path) -> Path:
        """ONNX Runtime's own cache file, which ``quantize_static(calibration_cache_path=...)`` reads."""
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(self.tensors, path)
        return path

    def with_amax(self, amax: dict[str, float]) -> Ranges:
        """A copy whose tensors ``amax`` get the symmetric range ``(-a, a)`` (a per-tensor repair)."""
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        data = dict(self.tensors.data)
        for name, value in amax.items():
            data[name] = TensorData(lowest=np.array(-value, np.float32), highest=np.array(value, np.float32))
        return Ranges(self.method, TensorsData(self.tensors.calibration_method, data), self.num_images,
                      self.num_batches)

    def amax(self, name: str) -> float:
        lowest, highest = self.tensors[name].range_value
        return max(abs(float(np.min(lowest))), abs(float(np.max(highest))))

    def table(self) -> dict[str, dict[str, float]]:
        """``{tensor: {min, max, amax, int8_scale}}``; ``int8_scale`` is the symmetric scale ``amax / 127``."""
        out = {}
        for name in sorted(self.tensors.keys()):
            lowest, highest = self.tensors[name].range_value
            low, high = float(np.min(lowest)), float(np.max(highest))
            amax = max(abs(low), abs(high))
            out[name] = {"min": low, "max": high, "amax": amax, "int8_scale": amax / 127.0}
        return out


def compute_ranges(model_path: Path, images: ImageBatches, method: Method, percentile: float, symmetric: bool,
                   workdir: Path) -> Ranges:
    """Run the calibration images through ``model_path`` once and reduce every float tensor to a range.

    ``symmetric`` asks the percentile method for ``(-p, p)`` of the absolute values (TensorRT's
    way); min/max and entropy ranges are symmetrised later by the quantizer where it needs it.
    """
    from onnxruntime.quantization import TensorsData, create_calibrator

    options = {"percentile": percentile, "symmetric": symmetric} if method is Method.PERCENTILE else {}
    with quiet():
        calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(workdir / "augmented.onnx"),
                                       calibrate_method=ort_method(method), extra_options=options)
        batches, count = 0, 0
        chunk: list[dict[str, np.ndarray]] = []
        for batch in images:
            chunk.append(batch)
            batches += 1
            count += len(next(iter(batch.values())))
            if len(chunk) == CALIBRATION_CHUNK[method]:
                calibrator.collect_data(OrtReader(chunk))
                chunk = []
        if chunk:
            calibrator.collect_data(OrtReader(chunk))
        tensors = calibrator.compute_data()
    if not isinstance(tensors, TensorsData) or not len(tensors.data):
        raise PromptsegError(f"{model_path}: calibration produced no tensor ranges")
    return Ranges(method, tensors, count, batches)


# ----------------------------------------------------------------------------- graph helpers


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (``op_index``): layers are kept float, ranked and pinned by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def quantisable_layers(model: onnx.ModelProto, op_types=TENSORRT_QUANT_OPS) -> list[str]:
    """Names of the nodes a quantiser may give Q/DQ (``op_types``), the output tail left out."""
    tail = set(output_tail(model))
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name not in tail]


def output_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the last convolutions and the graph outputs (kept float)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    tail, stack, seen = [], [o.name for o in model.graph.output], set()
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen or node.op_type not in _TAIL_OPS:
            continue
        seen.add(node.name)
        tail.append(node.name)
        stack.extend(node.input[:1] if node.op_type in _DATA_INPUT_ONLY else [i for i in node.input if i])
    return sorted(tail)


def fuse_residual_adds(model: onnx.ModelProto) -> int:
    """Drop the Q/DQ on the convolution branch of each quantised residual Add; returns how many.

    TensorRT fuses ``Conv -> Add(shortcut)`` when the shortcut arrives through Q/DQ and the
    convolution's own output does not (``Conv + Add`` becomes one INT8 kernel). Of two convolution
    branches (a block whose shortcut is the previous block's projection) the later-built one is the
    branch, the earlier one the shortcut.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    order = {node.name: i for i, node in enumerate(graph.node)}
    consumers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            consumers[name] += 1
    outputs = {o.name for o in graph.output}
    fused = 0
    for add in (n for n in graph.node if n.op_type == "Add"):
        branches = []
        for index, name in enumerate(add.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                break  # an input without Q/DQ: TensorRT cannot run this Add in INT8 anyway
            source = q.input[0]
            conv = producer.get(source)
            if (conv is not None and conv.op_type in CONV_LIKE and source not in outputs
                    and consumers[source] == 1 and consumers[q.output[0]] == 1 and consumers[name] == 1):
                branches.append((order[conv.name], index, source))
        else:
            if branches:
                _, index, source = max(branches)
                add.input[index] = source
                fused += 1
    prune_unused(model)
    return fused


def prune_unused(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes nobody reads any more, then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        changed = bool(dead)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def qdq_summary(model: onnx.ModelProto) -> dict:
    """Counts and zero points of the Q/DQ nodes: what a TensorRT-target model is checked against."""
    inits = {i.name: i for i in model.graph.initializer}
    counts: dict[str, int] = defaultdict(int)
    zero_dtypes, nonzero, missing = set(), [], []
    per_channel = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[node.op_type] += 1
        if any(a.name == "axis" for a in node.attribute) and node.input[0] in inits:
            per_channel += 1
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            missing.append(node.name)  # no zero point: the default is uint8 0, not what TensorRT wants
            continue
        zero_dtypes.add(onnx.TensorProto.DataType.Name(zp.data_type))
        if np.any(numpy_helper.to_array(zp) != 0):
            nonzero.append(node.name)
    return {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"],
            "per_channel_weights": per_channel, "zero_point_dtypes": sorted(zero_dtypes),
            "nonzero_zero_points": nonzero, "missing_zero_points": missing,
            "qoperator_ops": sorted({n.op_type for n in model.graph.node if n.op_type in QOPERATOR_OPS}),
            "foreign_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})}


def check_tensorrt_qdq(model: onnx.ModelProto, source: str) -> dict:
    """Raise unless every Q/DQ is int8 with zero point 0 and no QOperator or contrib op is left."""
    summary = qdq_summary(model)
    problems = []
    if not summary["QuantizeLinear"] or not summary["DequantizeLinear"]:
        problems.append("no Q/DQ nodes")
    if summary["zero_point_dtypes"] not in ([], ["INT8"]):
        problems.append(f"zero point types {summary['zero_point_dtypes']} (expected INT8)")
    for key in ("nonzero_zero_points", "missing_zero_points", "qoperator_ops", "foreign_domains"):
        if summary[key]:
            problems.append(f"{key.replace('_', ' ')}: {', '.join(summary[key][:5])}")
    if problems:
        raise PromptsegError(f"{source}: not a TensorRT explicit-quantization graph: " + "; ".join(problems))
    return summary


def _finish(model: onnx.ModelProto, extra: dict[str, str]) -> onnx.ModelProto:
    """Drop the quantizer's own metadata, add ours under ``promptseg.extra.``, run the checker."""
    from ..runtime.spec import METADATA_PREFIX

    keep = [(p.key, p.value) for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in keep + [(METADATA_PREFIX + "extra." + k, v) for k, v in extra.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------- quantisers


def _quantize(fp32_path: Path, out_path: Path, cache_path: Path, ranges: Ranges, *, fmt: str, activation: str,
              op_types: list[str] | None, exclude: list[str], extra_options: dict) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = {"WeightSymmetric": True, "ActivationSymmetric": activation == "s8", **extra_options}
    with quiet():
        quantize_static(str(fp32_path), str(out_path), None,
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        op_types_to_quantize=op_types, per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=ort_method(ranges.method), calibration_cache_path=str(cache_path),
                        extra_options=options)
    return onnx.load(str(out_path))


def quantize_tensorrt(fp32_path: Path, out_path: Path, cache_path: Path, ranges: Ranges,
                      extra: dict[str, str]) -> tuple[onnx.ModelProto, dict]:
    """The TensorRT-target QDQ model (see the module docstring), checked; returns it and its Q/DQ summary."""
    fp32 = onnx.load(str(fp32_path))
    present = {n.op_type for n in fp32.graph.node}
    op_types = [t for t in TENSORRT_QUANT_OPS if t in present]
    options = {"QuantizeBias": False, "OpTypesToExcludeOutputQuantization": sorted(present),
               "ForceQuantizeNoInputCheck": True, "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1}}
    model = _quantize(fp32_path, out_path, cache_path, ranges, fmt="qdq", activation="s8", op_types=op_types,
                      exclude=output_tail(fp32), extra_options=options)
    fused = fuse_residual_adds(model)
    model = _finish(model, extra)
    summary = check_tensorrt_qdq(model, str(out_path))
    summary["residual_adds_fused"] = fused
    onnx.save(model, str(out_path))
    return model, summary


def quantize_cpu(candidate: CpuCandidate, fp32_path: Path, out_path: Path, cache_path: Path, ranges: Ranges,
                 extra: dict[str, str], keep_float: tuple[str, ...] = ()) -> onnx.ModelProto:
    """One CPU candidate: QOperator or QDQ, u8 or s8 activations, all quantisable ops or convolutions only;
    the layers ``keep_float`` stay float."""
    if candidate.is_fp32:
        raise PromptsegError("the fp32 candidate is the model itself, nothing to quantise")
    fp32 = onnx.load(str(fp32_path))
    model = _quantize(fp32_path, out_path, cache_path, ranges, fmt=candidate.format, activation=candidate.activation,
                      op_types=list(CONV_LIKE) if candidate.ops == "conv" else None,
                      exclude=output_tail(fp32) + list(keep_float), extra_options={})
    model = _finish(model, extra)
    onnx.save(model, str(out_path))
    return model


def quantization_record(**fields) -> str:
    """A compact JSON string for ``promptseg.extra.quantization``."""
    return json.dumps(fields, sort_keys=True)
