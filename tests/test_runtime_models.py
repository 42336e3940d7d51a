"""Tiny ONNX models that follow the export spec, built with onnx.helper (no torch), for the runtime
tests; and the checks that they really follow the spec, so the other tests can rely on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from promptseg import __version__
from promptseg.data.palette import voc_palette
from promptseg.runtime.precision import graph_precision, model_precision
from promptseg.runtime.spec import CAM, SEGMENTER, ModelMetadata, read_metadata

CLASSES = ("background", "cat", "dog")
INPUT_SIZE = (32, 32)
DYNAMIC_IMAGE = ["batch", 3, "height", "width"]


def metadata(kind: str = "segmenter", class_names=CLASSES) -> ModelMetadata:
    palette = voc_palette(256)[: len(class_names)] if kind == "segmenter" else voc_palette(256)[1: len(class_names) + 1]
    return ModelMetadata(kind=kind, class_names=tuple(class_names),
                         palette=tuple(tuple(int(c) for c in rgb) for rgb in palette),
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=INPUT_SIZE,
                         method="test", promptseg_version=__version__)


def _weights(classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (classes, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, classes).astype(np.float32)


def _save(nodes, initializers, outputs, meta: ModelMetadata, path: Path) -> Path:
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, DYNAMIC_IMAGE)],
                              outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def tiny_segmenter(path: Path, precision: str = "fp32", class_names=CLASSES, seed: int = 0,
                   weight_levels: int = 127) -> Path:
    """A 3x3 conv to ``len(class_names)`` logits and an ArgMax: the SEGMENTER spec, dynamic N/H/W.

    ``int8`` puts Q/DQ on the input and weights (as a calibrated export would), the weights in
    ``-weight_levels..weight_levels``; ``fp16`` computes in float16 between casts (as an AutoCast
    export would; ONNX Runtime's CPU provider may lack it).
    """
    weight, bias = _weights(len(class_names), seed)
    nodes, inits = [], []
    if precision == "int8":
        scale = float(np.abs(weight).max() / weight_levels)
        inits += [numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
                  numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                  numpy_helper.from_array(np.round(weight / scale).astype(np.int8), "Wq"),
                  numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
                  numpy_helper.from_array(bias, "B")]
        nodes += [helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zero"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"]),
                  helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["W"])]
        nodes.append(helper.make_node("Conv", ["xdq", "W", "B"], ["logits"], pads=[1, 1, 1, 1]))
    elif precision == "fp16":
        inits += [numpy_helper.from_array(weight.astype(np.float16), "W"),
                  numpy_helper.from_array(bias.astype(np.float16), "B")]
        nodes += [helper.make_node("Cast", ["image"], ["x16"], to=TensorProto.FLOAT16),
                  helper.make_node("Conv", ["x16", "W", "B"], ["y16"], pads=[1, 1, 1, 1]),
                  helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT)]
    else:
        inits += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
        nodes.append(helper.make_node("Conv", ["image", "W", "B"], ["logits"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("ArgMax", ["logits"], ["labels"], axis=1, keepdims=0))
    logits_shape = ["batch", len(class_names), "height", "width"]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape),
               helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", "height", "width"])]
    return _save(nodes, inits, outputs, metadata("segmenter", class_names), path)


def tiny_cam(path: Path, class_names=CLASSES[1:]) -> Path:
    """The CAM spec: ReLU'd conv maps (``cams``) and sigmoid of their means (``scores``)."""
    weight, bias = _weights(len(class_names), 1)
    nodes = [helper.make_node("Conv", ["image", "W", "B"], ["raw"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["raw"], ["cams"]),
             helper.make_node("GlobalAveragePool", ["raw"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Sigmoid", ["flat"], ["scores"])]
    outputs = [helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["batch", len(class_names), "height", "width"]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", len(class_names)])]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    return _save(nodes, inits, outputs, metadata("cam", class_names), path)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tiny_segmenters_follow_the_spec_and_read_as_their_precision(tmp_path, precision):
    path = tiny_segmenter(tmp_path / f"seg_{precision}.onnx", precision)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == SEGMENTER.input_names
    assert [o.name for o in model.graph.output] == SEGMENTER.output_names
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == DYNAMIC_IMAGE
    assert model.graph.output[1].type.tensor_type.elem_type == TensorProto.INT64
    assert read_metadata(path) == metadata()
    assert graph_precision(model) == model_precision(path) == precision


def test_tiny_cam_follows_the_spec(tmp_path):
    model = onnx.load(str(tiny_cam(tmp_path / "cam.onnx")))
    assert [o.name for o in model.graph.output] == CAM.output_names
    assert graph_precision(model) == "fp32"
