"""Small ONNX graphs that segment the tiny world for real, built in seconds with numpy, and the
planted defects that break per-tensor INT8 while leaving FP32 unchanged.

The network: normalisation -> ``pool_rows``, ``pool`` (fixed depthwise convolutions: box means of each
colour channel at 1, 5, 11 and 21 pixels) -> ``hidden`` (a random 1x1 convolution) -> ReLU -> ``head`` (a
1x1 convolution fitted in closed form, ridge regression of one-hot labels on the hidden features of
the train split). The segmenter's head predicts background and the six classes (tiny world val:
mIoU about 70%, foreground on about 7% of the pixels as in the ground truth); the CAM graph's head
predicts the six foreground maps, made into CAMs as ``CamForExport`` makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from promptseg import __version__
from promptseg.calibration.equalise import Pair, scale_pair
from promptseg.runtime.spec import ModelMetadata

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BOX_SIZES = (1, 5, 11, 21)
HIDDEN = 96
CAM_THRESHOLD = 0.3


def _load(world: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = (world / f"ImageSets/Segmentation/{split}.txt").read_text().split()
    images = np.stack([np.asarray(Image.open(world / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids])
    masks = np.stack([np.asarray(Image.open(world / "SegmentationClass" / f"{i}.png")) for i in ids])
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 255, masks, ids


def _features(seed: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Normalisation, the box means (separable: a 1 x k row box per colour and size, then a k x 1
    column box per channel) and the random hidden layer with its ReLU; output ``features``."""
    rng = np.random.default_rng(seed)
    k = max(BOX_SIZES)
    channels = 3 * len(BOX_SIZES)
    row = np.zeros((channels, 1, 1, k), np.float32)
    for channel in range(channels):
        size = BOX_SIZES[channel % len(BOX_SIZES)]
        row[channel, 0, 0, (k - size) // 2:(k - size) // 2 + size] = 1.0 / size
    hidden = (rng.standard_normal((HIDDEN, channels, 1, 1)) * np.sqrt(2 / channels)).astype(np.float32)
    arrays = {"mean": np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1),
              "inv_std": 1 / np.asarray(STD, np.float32).reshape(1, 3, 1, 1),
              "pool_rows.weight": row, "pool_rows.bias": np.zeros(channels, np.float32),
              "pool.weight": row.transpose(0, 1, 3, 2).copy(), "pool.bias": np.zeros(channels, np.float32),
              "hidden.weight": hidden, "hidden.bias": (rng.standard_normal(HIDDEN) * 0.5).astype(np.float32)}
    nodes = [helper.make_node("Sub", ["image", "mean"], ["centred"], name="normalise_sub"),
             helper.make_node("Mul", ["centred", "inv_std"], ["normalised"], name="normalise_mul"),
             helper.make_node("Conv", ["normalised", "pool_rows.weight", "pool_rows.bias"], ["rows"], name="pool_rows",
                              kernel_shape=[1, k], pads=[0, k // 2, 0, k // 2], group=3),
             helper.make_node("Conv", ["rows", "pool.weight", "pool.bias"], ["pool"], name="pool",
                              kernel_shape=[k, 1], pads=[k // 2, 0, k // 2, 0], group=channels),
             helper.make_node("Conv", ["pool", "hidden.weight", "hidden.bias"], ["hidden"], name="hidden"),
             helper.make_node("Relu", ["hidden"], ["features"], name="hidden_relu")]
    return nodes, [numpy_helper.from_array(v, n) for n, v in arrays.items()]


def _model(nodes, inits, outputs) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    graph = helper.make_graph(nodes, "small", [image], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fit(world: Path, nodes, inits, targets_of, bg_weight: float) -> np.ndarray:
    """Ridge regression (bias column last) of ``targets_of(masks)`` on the features of every 3rd train pixel."""
    import onnxruntime as ort

    x, masks, _ = _load(world, "train")
    probe = _model(nodes, inits, [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)])
    features = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0][:, :, ::3, ::3]
    labels = masks[:, ::3, ::3].reshape(-1)
    f = features.transpose(0, 2, 3, 1).reshape(-1, HIDDEN).astype(np.float64)
    keep = labels != 255
    f, labels = np.concatenate([f[keep], np.ones((keep.sum(), 1))], 1), labels[keep]
    weight = np.where(labels == 0, bg_weight, 1.0)[:, None]
    gram = f.T @ (f * weight) + 1e-1 * np.eye(f.shape[1])
    return np.linalg.solve(gram, f.T @ (targets_of(labels) * weight))


def _metadata(model: onnx.ModelProto, kind: str, names: tuple[str, ...], extra: dict | None = None) -> None:
    meta = ModelMetadata(kind=kind, class_names=names, palette=tuple((20 * k, 90, 200 - 20 * k) for k in
                                                                      range(len(names))),
                         mean=MEAN, std=STD, input_size=(64, 64), method="test", promptseg_version=__version__,
                         extra=extra or {})
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)


def build_segmenter(world: Path, out: Path, seed: int = 0) -> Path:
    """``segmenter.onnx`` (outputs ``logits``, ``labels``) for the tiny world ``world``."""
    classes = tuple(json.loads((world / "classes.json").read_text())["names"])
    nodes, inits = _features(seed)
    solution = _fit(world, nodes, inits, lambda labels: np.eye(len(classes) + 1)[labels], 0.3)
    inits += [numpy_helper.from_array(solution[:-1].T[:, :, None, None].astype(np.float32), "head.weight"),
              numpy_helper.from_array(solution[-1].astype(np.float32), "head.bias")]
    nodes += [helper.make_node("Conv", ["features", "head.weight", "head.bias"], ["logits"], name="head"),
              helper.make_node("ArgMax", ["logits"], ["labels"], name="argmax", axis=1, keepdims=0)]
    model = _model(nodes, inits, [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes) + 1, "height", "width"]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", "height", "width"])])
    _metadata(model, "segmenter", ("background", *classes))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return out


def build_cam(world: Path, out: Path, seed: int = 0, threshold: float | None = CAM_THRESHOLD) -> Path:
    """``cam.onnx`` (outputs ``cams`` 0..1 per foreground class, ``scores``); ``threshold`` recorded
    as the run's (None: not recorded)."""
    classes = tuple(json.loads((world / "classes.json").read_text())["names"])
    nodes, inits = _features(seed)
    solution = _fit(world, nodes, inits, lambda labels: np.eye(len(classes) + 1)[labels][:, 1:], 1.0)
    inits += [numpy_helper.from_array(solution[:-1].T[:, :, None, None].astype(np.float32), "cam_head.weight"),
              numpy_helper.from_array(solution[-1].astype(np.float32), "cam_head.bias"),
              numpy_helper.from_array(np.array([2, 3], np.int64), "spatial"),
              numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes += [helper.make_node("Conv", ["features", "cam_head.weight", "cam_head.bias"], ["raw"], name="cam_head"),
              helper.make_node("Relu", ["raw"], ["positive"], name="cam_relu"),
              helper.make_node("ReduceMax", ["positive", "spatial"], ["peak_raw"], name="cam_peak", keepdims=1),
              helper.make_node("Max", ["peak_raw", "eps"], ["peak"], name="cam_peak_floor"),
              helper.make_node("Div", ["positive", "peak"], ["cams"], name="cam_normalise"),
              helper.make_node("ReduceMean", ["raw", "spatial"], ["pooled"], name="cam_pool", keepdims=0),
              helper.make_node("Sigmoid", ["pooled"], ["scores"], name="cam_scores")]
    model = _model(nodes, inits, [
        helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["batch", len(classes), "height", "width"]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", len(classes)])])
    _metadata(model, "cam", classes, {} if threshold is None else {"cam_threshold": str(threshold)})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return out


def plant_outlier_channel(source: Path, out: Path, pair: Pair, channel: int = 0, factor: float = 300.0) -> Path:
    """The issue's defect: ``pair.first``'s output ``channel`` scaled by ``factor`` before the ReLU and
    by ``1 / factor`` in ``pair.second`` (FP32 unchanged; per-tensor INT8 of the middle tensor broken)."""
    model = onnx.load(str(source))
    channels = next(i for i in model.graph.initializer if i.name == next(
        n for n in model.graph.node if n.name == pair.first).input[1]).dims[0]
    scales = np.ones(channels)
    scales[channel] = 1.0 / factor
    scale_pair(model, pair, scales)
    onnx.save(model, str(out))
    return out


def plant_offset(source: Path, out: Path, offset: float = 200.0) -> Path:
    """Every channel of ``pool`` shifted by ``offset``, ``hidden``'s bias compensating (FP32 unchanged):
    the tensor ``hidden`` reads sits far from zero, which no per-channel rescaling or clipping balances."""
    model = onnx.load(str(source))
    inits = {i.name: i for i in model.graph.initializer}
    pool_bias = numpy_helper.to_array(inits["pool.bias"]) + np.float32(offset)
    weight = numpy_helper.to_array(inits["hidden.weight"]).astype(np.float64)
    hidden_bias = numpy_helper.to_array(inits["hidden.bias"]) - offset * weight.sum(axis=(1, 2, 3))
    inits["pool.bias"].CopyFrom(numpy_helper.from_array(pool_bias.astype(np.float32), "pool.bias"))
    inits["hidden.bias"].CopyFrom(numpy_helper.from_array(hidden_bias.astype(np.float32), "hidden.bias"))
    onnx.save(model, str(out))
    return out
