"""Which quantised layer breaks INT8: each one left in float alone, and each one quantised alone.

A *layer* is an op of the QDQ graph that reads at least one DequantizeLinear: its Q/DQ group is the
Q/DQ pairs on its inputs (its activations, per tensor, and its weights, per channel). Keeping a layer
in float means removing that group (its inputs read the float tensors and weights; TensorRT then runs
it in FP16 or FP32), which is also how ``--keep-float`` ships it.

The cheap proxy is measured for every layer on a few calibration images: the signal-to-quantisation-
noise ratio (SQNR, dB) of the graph's float output (the segmenter's logits, the CAM graph's cams)
against FP32, and the share of labels that change. Layers are ranked by the SQNR with only that
layer quantised (lowest first: the most damaging alone); the caller runs the real gate on the top
of that list.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .gate import Labeller, ort_session
from .quantize import prune_unused

MAX_SQNR_DB = 150.0  # what an output identical to FP32 reports (a finite number for JSON)


@dataclass(frozen=True)
class Layer:
    """A quantised op: ``activations`` are the float tensors it reads through Q/DQ, ``weights`` the
    initializers it reads through DequantizeLinear."""

    name: str
    op_type: str
    activations: tuple[str, ...]
    weights: tuple[str, ...]


def quantised_layers(qdq: onnx.ModelProto) -> list[Layer]:
    """The layers of a QDQ graph in graph order."""
    producer = {out: node for node in qdq.graph.node for out in node.output}
    layers = []
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        activations, weights = [], []
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                activations.append(q.input[0])
            else:
                weights.append(dq.input[0])
        if activations or weights:
            layers.append(Layer(node.name, node.op_type, tuple(activations), tuple(weights)))
    return layers


def with_float_layers(qdq: onnx.ModelProto, source: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``qdq`` whose layers ``names`` read float inputs: each input that came through
    DequantizeLinear becomes the same node's input in ``source`` (the FP32 graph that was quantised;
    float weights are copied from it), then Q/DQ nodes and initializers nobody reads are removed."""
    names = set(names)
    out = copy.deepcopy(qdq)
    if not names:
        return out
    producer = {o: n for n in out.graph.node for o in n.output}
    source_nodes = {n.name: n for n in source.graph.node}
    source_inits = {i.name: i for i in source.graph.initializer}
    have = {i.name for i in out.graph.initializer}
    for node in out.graph.node:
        if node.name not in names:
            continue
        original = source_nodes[node.name]
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            float_name = original.input[index]
            node.input[index] = float_name
            if float_name in source_inits and float_name not in have:
                out.graph.initializer.append(copy.deepcopy(source_inits[float_name]))
                have.add(float_name)
    prune_unused(out)
    return out


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """``10 log10(sum(ref^2) / sum((out - ref)^2))``, at most :data:`MAX_SQNR_DB`."""
    noise = float(np.sum((output.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise <= signal * 10 ** (-MAX_SQNR_DB / 10):
        return MAX_SQNR_DB
    return round(10.0 * np.log10(max(signal, 1e-30) / noise), 3)


@dataclass
class ProxyImages:
    """A few calibration images and the FP32 model's float output and label maps on them."""

    batch: np.ndarray
    image_labels: Sequence[np.ndarray | None]
    reference: np.ndarray
    reference_labels: np.ndarray

    @classmethod
    def from_fp32(cls, fp32, batch: np.ndarray, image_labels, labeller: Labeller, input_name: str,
                  threads: int) -> ProxyImages:
        session = ort_session(fp32, threads)
        reference, raw = session.run([labeller.float_output, labeller.output], {input_name: batch})
        return cls(batch, list(image_labels), reference, labeller.labels(raw, image_labels))

    def error(self, model: onnx.ModelProto, labeller: Labeller, input_name: str, threads: int) -> dict:
        """``{"sqnr_db", "label_change"}`` of ``model`` against FP32 on these images (float between Q/DQ,
        as the TensorRT gate runs it)."""
        output, raw = ort_session(model, threads, int8_kernels=False).run([labeller.float_output, labeller.output],
                                                      {input_name: self.batch})
        labels = labeller.labels(raw, self.image_labels)
        return {"sqnr_db": sqnr_db(self.reference, output),
                "label_change": round(float(np.mean(labels != self.reference_labels)), 6)}


    def max_abs_diff(self, model: onnx.ModelProto, labeller: Labeller, input_name: str, threads: int) -> float:
        """Largest difference of ``model``'s float output from FP32's (an FP32 rewrite must keep it ~0)."""
        output = ort_session(model, threads).run([labeller.float_output], {input_name: self.batch})[0]
        return float(np.max(np.abs(output.astype(np.float64) - self.reference)))


def proxy_sensitivity(qdq: onnx.ModelProto, source: onnx.ModelProto, images: ProxyImages, labeller: Labeller, *,
                      input_name: str, threads: int, progress=None) -> tuple[dict, list[dict]]:
    """The proxy for the whole INT8 graph and, per layer, with only it float and with only it
    quantised; the rows ranked (``rank`` 1 = the most damaging quantised alone)."""
    layers = quantised_layers(qdq)
    everything = images.error(qdq, labeller, input_name, threads)
    names = [layer.name for layer in layers]
    rows = []
    for layer in layers:
        only_float = images.error(with_float_layers(qdq, source, [layer.name]), labeller, input_name, threads)
        only_quantised = images.error(with_float_layers(qdq, source, [n for n in names if n != layer.name]),
                                      labeller, input_name, threads)
        rows.append({"layer": layer.name, "op": layer.op_type, "activations": list(layer.activations),
                     "proxy": {"only_float": only_float, "only_quantised": only_quantised}})
        if progress is not None:
            progress()
    rows.sort(key=lambda r: (r["proxy"]["only_quantised"]["sqnr_db"], -r["proxy"]["only_float"]["sqnr_db"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return everything, rows
