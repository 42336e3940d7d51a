"""Cross-layer range equalisation: ``Conv -> ReLU -> Conv`` rescaled per channel, exact in FP32.

Per-tensor INT8 gives every channel of a tensor one scale, so a single channel whose range is
hundreds of times the others' leaves them a few levels each. Where the first convolution's output
reaches the second only through a positively homogeneous op (ReLU, LeakyReLU: ``f(x / s) = f(x) / s``
for ``s > 0``) or directly, dividing its output channel ``i`` by ``s_i`` and multiplying the second's
input channel ``i`` by ``s_i`` changes nothing in FP32 (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019). The first convolution's weights are
quantised per output channel, so its side costs nothing; the second's weights are quantised per
output channel too, so a column scaled up widens its rows' ranges. ``s`` balances the two: after
it, every channel's activation range over its weight-column range is the same number (with a
depthwise second convolution, which has one column per row, the activation ranges simply match).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

EQUALISABLE_ACTIVATIONS = ("Relu", "LeakyRelu")
# a pair is rescaled when its largest channel range is this many times the median one: it then costs
# the median channel 3 of int8's 7 magnitude bits; below that, rescaling trades little for weight range
MIN_IMBALANCE = 8.0


@dataclass(frozen=True)
class Pair:
    """Two convolutions whose shared channels can be rescaled: ``first``'s output channel ``i`` is
    divided by ``s_i``, ``second``'s input channel ``i`` multiplied; ``tensor`` is what ``second``
    reads (the tensor quantised per tensor), ``activation`` the op between (or None)."""

    first: str
    second: str
    tensor: str
    activation: str | None


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def find_pairs(model: onnx.ModelProto) -> list[Pair]:
    """Every ``Conv -> [ReLU | LeakyReLU] -> Conv`` chain whose middle tensors have one reader each,
    with weights (and biases) that are initializers of their own; in graph order."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}

    def own_constant(name: str) -> bool:
        return name in inits and uses[name] == 1 and inits[name].data_type == onnx.TensorProto.FLOAT

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        return readers[tensor][0] if tensor not in outputs and len(readers[tensor]) == 1 else None

    pairs = []
    for first in graph.node:
        if first.op_type != "Conv" or len(first.input) < 2 or not own_constant(first.input[1]):
            continue
        if len(first.input) > 2 and first.input[2] and not own_constant(first.input[2]):
            continue
        tensor, activation = first.output[0], None
        second = only_reader(tensor)
        if second is not None and second.op_type in EQUALISABLE_ACTIVATIONS:
            activation, tensor = second.op_type, second.output[0]
            second = only_reader(tensor)
        if second is None or second.op_type != "Conv" or second.input[0] != tensor or len(second.input) < 2 \
                or not own_constant(second.input[1]):
            continue
        out_channels = inits[first.input[1]].dims[0]
        if inits[second.input[1]].dims[1] * _attribute(second, "group", 1) != out_channels:
            continue
        pairs.append(Pair(first.name, second.name, tensor, activation))
    return pairs


def _weights(model: onnx.ModelProto, pair: Pair):
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    first, second = nodes[pair.first], nodes[pair.second]
    bias = inits[first.input[2]] if len(first.input) > 2 and first.input[2] else None
    return inits[first.input[1]], bias, inits[second.input[1]], int(_attribute(second, "group", 1))


def _grouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """``Cout x Cin/g x kh x kw`` -> ``g x Cout/g x Cin/g x kh x kw``: input channel ``i`` sits at
    ``[i // (Cin/g), :, i % (Cin/g)]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def scale_pair(model: onnx.ModelProto, pair: Pair, scales: np.ndarray) -> None:
    """In place: ``first``'s output channel ``i`` divided by ``scales[i]``, ``second``'s input channel
    ``i`` multiplied by it. Exact in FP32 for positive scales (rounding aside)."""
    scales = np.asarray(scales, np.float64)
    if np.any(~np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError("equalisation scales must be positive and finite")
    w1, b1, w2, groups = _weights(model, pair)
    first = numpy_helper.to_array(w1).astype(np.float64)
    w1.CopyFrom(numpy_helper.from_array((first / scales.reshape(-1, *[1] * (first.ndim - 1))).astype(np.float32),
                                        w1.name))
    if b1 is not None:
        b1.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(b1) / scales).astype(np.float32), b1.name))
    second = _grouped(numpy_helper.to_array(w2).astype(np.float64), groups)
    per_input = scales.reshape(groups, 1, second.shape[2], *[1] * (second.ndim - 3))
    w2.CopyFrom(numpy_helper.from_array((second * per_input).reshape(numpy_helper.to_array(w2).shape)
                                        .astype(np.float32), w2.name))


def balanced_scales(model: onnx.ModelProto, pair: Pair, channel_amax: np.ndarray) -> np.ndarray:
    """The ``s`` that makes ``activation range / weight-column range`` equal across channels (its
    geometric mean 1); channels that are never active, or read with zero weights, keep 1."""
    _, _, w2, groups = _weights(model, pair)
    second = _grouped(np.abs(numpy_helper.to_array(w2)).astype(np.float64), groups)
    a = np.asarray(channel_amax, np.float64)
    if second.shape[2] == 1:  # one input channel per output channel: only the activations matter
        ratio = a
        root = 1.0
    else:
        columns = second.max(axis=(1, *range(3, second.ndim))).reshape(-1)  # g x Cin/g -> Cin
        ratio = np.divide(a, columns, out=np.zeros_like(a), where=columns > 0)
        root = 0.5
    valid = np.isfinite(ratio) & (ratio > 0)
    scales = np.ones_like(a)
    if valid.any():
        centre = np.exp(np.mean(np.log(ratio[valid])))
        scales[valid] = (ratio[valid] / centre) ** root
    return scales


def imbalance(channel_amax: np.ndarray) -> float:
    """Largest channel range over the median channel range (1: balanced); 0 for a silent tensor."""
    a = np.asarray(channel_amax, np.float64)
    median = float(np.median(a[a > 0])) if np.any(a > 0) else 0.0
    return float(a.max() / median) if median > 0 else 0.0


def equalise(model: onnx.ModelProto, pairs: list[Pair], channel_amax: dict[str, np.ndarray],
             min_imbalance: float = MIN_IMBALANCE) -> list[dict]:
    """Rescale in place the pairs whose middle tensor's largest channel range is at least
    ``min_imbalance`` times its median one (from the ranges of the model as it was: rescaling one pair
    leaves every other pair's middle tensor unchanged); returns one record per pair, rescaled or not."""
    records = []
    for pair in pairs:
        a = channel_amax[pair.tensor]
        before = imbalance(a)
        scales = balanced_scales(model, pair, a) if before >= min_imbalance else np.ones_like(a, np.float64)
        if before >= min_imbalance:
            scale_pair(model, pair, scales)
        records.append({"first": pair.first, "second": pair.second, "tensor": pair.tensor,
                        "activation": pair.activation, "channels": int(len(a)), "equalised": before >= min_imbalance,
                        "scale_min": float(scales.min()), "scale_max": float(scales.max()),
                        "imbalance_before": round(before, 2), "imbalance_after": round(imbalance(a / scales), 2)})
    return records
