"""INT8 that never collapses silently: models built to break per-tensor INT8 fail plain INT8, the
report names the layer, and the repair passes the default 1.0 gate with the fewest layers out of INT8.

Plants (FP32 unchanged, tests/int8_models.py): one channel of ``hidden`` scaled by 300 before its ReLU
and by 1/300 in ``head`` (the issue's defect; equalisation fixes it), and every channel of ``pool``
shifted by 200 (a tensor far from zero: no rescaling or clipping balances it, only float does).
The demo's own two networks, calibrated by the pipeline, close the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from int8_models import build_cam, plant_offset, plant_outlier_channel

from promptseg.calibration import CalibrationConfig, CalibrationGateError, calibrate
from promptseg.calibration.equalise import Pair, find_pairs, scale_pair
from promptseg.calibration.gate import ort_session
from promptseg.calibration.quantize import output_tail
from promptseg.calibration.sensitivity import quantised_layers, with_float_layers
from promptseg.errors import ConfigError

FAST = {"num": 16, "gate_num": 32, "latency_runs": 2, "latency_batch": 2, "batch": 8, "image_counts": (),
        "proxy_images": 4}
HEAD_PAIR = Pair("hidden", "head", "features", "Relu")


def _outputs(model, x: np.ndarray, names=("logits",)) -> list[np.ndarray]:
    return ort_session(model, 2, int8_kernels=False).run(list(names), {"image": x})


def _images(world: Path, count: int = 8) -> np.ndarray:
    from PIL import Image

    ids = (world / "ImageSets/Segmentation/val.txt").read_text().split()[:count]
    return np.stack([np.asarray(Image.open(world / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids]
                    ).transpose(0, 3, 1, 2).astype(np.float32) / 255


@pytest.fixture(scope="module")
def outlier_model(int8_segmenter, tmp_path_factory) -> Path:
    return plant_outlier_channel(int8_segmenter, tmp_path_factory.mktemp("outlier") / "segmenter.onnx", HEAD_PAIR)


@pytest.fixture(scope="module")
def offset_model(int8_segmenter, tmp_path_factory) -> Path:
    return plant_offset(int8_segmenter, tmp_path_factory.mktemp("offset") / "segmenter.onnx")


# ----------------------------------------------------------------------------- the pieces


def test_pairs_and_rescaling_are_exact_in_fp32(tiny_world, int8_segmenter, int8_cam, outlier_model, offset_model):
    model = onnx.load(str(int8_segmenter))
    assert [(p.first, p.second, p.activation) for p in find_pairs(model)] == [
        ("pool_rows", "pool", None), ("pool", "hidden", None), ("hidden", "head", "Relu")]
    # the CAM head's output has two readers (the maps and the pooled scores): no pair after it
    assert all(p.first != "cam_head" for p in find_pairs(onnx.load(str(int8_cam))))
    x = _images(tiny_world)
    reference = _outputs(int8_segmenter, x)[0]
    for planted in (outlier_model, offset_model):  # the plants change nothing in FP32 ...
        assert np.abs(_outputs(planted, x)[0] - reference).max() < 1e-4 * np.abs(reference).max()
    rng = np.random.default_rng(0)
    for pair in find_pairs(model):  # ... and neither does any positive rescaling of any pair
        channels = next(i for i in model.graph.initializer if i.name == f"{pair.first}.weight").dims[0]
        scale_pair(model, pair, np.exp(rng.normal(0, 2, channels)))
    assert np.abs(_outputs(model, x)[0] - reference).max() < 1e-4 * np.abs(reference).max()
    with pytest.raises(ValueError, match="positive and finite"):
        scale_pair(model, HEAD_PAIR, np.zeros(96))


def test_keeping_layers_float_removes_their_qdq_only(tiny_world, int8_segmenter, tmp_path):
    report = calibrate(CalibrationConfig(model=str(int8_segmenter), out=str(tmp_path), data=str(tiny_world),
                                         keep_float=("hidden",), **FAST))
    model = onnx.load(str(tmp_path / "segmenter.tensorrt.onnx"))
    layers = {layer.name: layer for layer in quantised_layers(model)}
    assert set(layers) == {"pool_rows", "pool", "head"}  # hidden reads float input and float weights
    hidden = next(n for n in model.graph.node if n.name == "hidden")
    assert list(hidden.input) == ["pool", "hidden.weight", "hidden.bias"]
    assert [s["step"] for s in report["repair"]["steps"]] == ["plain", "pinned"]
    assert report["repair"]["repairs"] == [{"layer": "hidden", "action": "kept float (pinned)"}]
    everything_float = with_float_layers(model, onnx.load(str(int8_segmenter)), layers)
    assert not [n for n in everything_float.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    x = _images(tiny_world)
    np.testing.assert_array_equal(_outputs(everything_float, x)[0], _outputs(int8_segmenter, x)[0])


# ----------------------------------------------------------------------------- planted defects


def test_outlier_channel_fails_plain_int8_and_equalisation_repairs_it(tiny_world, outlier_model, tmp_path):
    options = {"model": str(outlier_model), "data": str(tiny_world), **FAST}
    with pytest.raises(CalibrationGateError, match="the layer that breaks INT8: head") as info:
        calibrate(CalibrationConfig(out=str(tmp_path / "plain"), repair=False, **options))
    plain = info.value.report
    assert plain["miou_drop"] > 20 and plain["repair"]["culprit"]["layer"] == "head"
    assert not (tmp_path / "plain" / "segmenter.tensorrt.onnx").exists()

    report = calibrate(CalibrationConfig(out=str(tmp_path / "repaired"), **{**options, "image_counts": (8, 16)}))
    repair = report["repair"]
    assert report["gate_passed"] and report["miou_drop"] <= 1.0
    assert [(s["step"], s["kept"]) for s in repair["steps"]] == [("plain", True), ("equalisation", True)]
    assert repair["steps"][0]["drop"] > 20 and repair["steps"][1]["fp32_max_abs_diff"] < 1e-4
    assert [(r["layer"], r["action"]) for r in repair["repairs"]] == [("head", "equalised with hidden")]
    assert repair["repairs"][0]["imbalance_before"] > 100 and repair["repairs"][0]["imbalance_after"] < 8
    # the ranking: head breaks INT8 alone, and alone in float repairs it (proxy and gate agree)
    head = repair["sensitivity"][0]["layers"][0]
    assert head["layer"] == "head" and head["rank"] == 1
    assert head["gate"]["only_quantised_drop"] > 20 and head["gate"]["only_float_drop"] < 1.0
    assert head["proxy"]["only_float"]["sqnr_db"] > head["proxy"]["only_quantised"]["sqnr_db"] + 10
    assert all(r["images"] in (8, 16) and r["drop_plain"] > 20 and r["passed"] for r in repair["calibration_images"])
    assert all("latency_ms" in s for s in repair["steps"])  # each kept step's CPU cost is measured
    shipped = tmp_path / "repaired" / "segmenter.tensorrt.onnx"
    model = onnx.load(str(shipped))
    assert len(quantised_layers(model)) == 4  # nothing kept float
    assert json.loads(dict((p.key, p.value) for p in model.metadata_props)["promptseg.extra.quantization"])[
        "equalised"] is True
    x = _images(tiny_world, 32)
    labels_int8 = _outputs(shipped, x, ("labels",))[0]
    assert (labels_int8 == _outputs(outlier_model, x, ("labels",))[0]).mean() > 0.99


def test_offset_tensor_needs_the_float_fallback_of_one_layer(tiny_world, offset_model, tmp_path):
    from promptseg.cli import main

    result = CliRunner().invoke(main, ["calibrate", str(offset_model), "--data", str(tiny_world), "--num", "16",
                                       "--gate-num", "32", "--latency-runs", "2", "--latency-batch", "2",
                                       "--image-counts", "8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "calibration_report.json").read_text())
    repair = report["repair"]
    steps = {s["step"]: s for s in repair["steps"]}
    assert steps["plain"]["drop"] > 20 and report["miou_drop"] <= 1.0 and report["gate_passed"]
    assert not steps["equalisation"]["kept"] and not steps["tensor ranges"]["kept"]  # measured, did not help
    assert steps["tensor ranges"]["trials"] and all(t["drop"] > 20 for t in steps["tensor ranges"]["trials"])
    assert [(r["layer"], r["action"]) for r in repair["repairs"]] == [("hidden", "kept float")]  # the fewest
    assert repair["culprit"]["layer"] == "hidden"
    assert {layer.name for layer in quantised_layers(onnx.load(str(tmp_path / "segmenter.tensorrt.onnx")))} == {
        "pool_rows", "pool", "head"}
    assert "keep float" in result.output and "hidden: kept float" in result.output
    assert (tmp_path / "calibration_sensitivity.png").is_file()


# ----------------------------------------------------------------------------- the CAM network


def test_cam_graph_ships_int8_gated_on_its_pseudo_masks(tiny_world, int8_cam, tmp_path):
    report = calibrate(CalibrationConfig(model=str(int8_cam), out=str(tmp_path), data=str(tiny_world), **FAST))
    assert report["kind"] == "cam" and report["gate_passed"] and report["miou_drop"] <= 1.0
    assert "pseudo-masks from the CAMs at threshold 0.3" in report["gate_metric"]
    assert report["miou_fp32"] > 60  # the pseudo-masks are real: every class found
    assert set(report["per_class_iou"]["int8"]) == {"background", "boat", "train", "cow", "plane", "car", "bird"}
    assert min(report["per_class_iou"]["int8"].values()) > 30
    shipped = onnx.load(str(tmp_path / "cam.tensorrt.onnx"))
    assert quantised_layers(shipped) and {o.name for o in shipped.graph.output} == {"cams", "scores"}
    bare = build_cam(tiny_world, tmp_path / "bare.onnx", threshold=None)
    with pytest.raises(ConfigError, match=r"cam_threshold: .* records none \| expected --cam-threshold"):
        calibrate(CalibrationConfig(model=str(bare), out=str(tmp_path / "bare"), data=str(tiny_world), **FAST))


# ----------------------------------------------------------------------------- the demo's own networks


def test_the_demo_ships_both_networks_in_int8_with_their_own_gates(tiny_demo, tiny_export):
    """The pipeline's own stages (run once by the ``tiny_demo`` fixture): the LR-ASPP segmenter and the
    CAM network each calibrated for TensorRT, ranked layer by layer, gated on held-out images. (At toy
    size the segmenter barely finds foreground; bench/int8_repair.py plants the issue's defect in a
    trained one.)"""
    segmenter = onnx.load(str(tiny_export / "segmenter.onnx"))
    by_name = {n.name: n.op_type for n in segmenter.graph.node}
    assert sorted(by_name[name] for name in output_tail(segmenter)) == ["Add", "ArgMax", "Resize", "Resize"]
    report = json.loads((tiny_demo / "report.json").read_text())
    for key, stem, kind in (("tensorrt", "segmenter", "segmenter"), ("cam_tensorrt", "cam", "cam")):
        assert report["calibration"][key]["gate_passed"], key
        run = json.loads((tiny_demo / f"int8_{key}" / "calibration_report.json").read_text())
        assert run["kind"] == kind and run["target"] == "tensorrt"
        shipped = onnx.load(str(tiny_demo / f"int8_{key}" / f"{stem}.tensorrt.onnx"))
        layers = quantised_layers(shipped)
        ranked = run["repair"]["sensitivity"][0]["layers"]
        assert len(ranked) == len(layers) > 20 and sorted(r["rank"] for r in ranked) == list(range(1, len(layers) + 1))
        assert (tiny_demo / f"int8_{key}" / "calibration_sensitivity.png").is_file()
        assert run["repair"]["calibration_images"][0]["images"] == 16
    segmenter_run = json.loads((tiny_demo / "int8_tensorrt" / "calibration_report.json").read_text())
    assert segmenter_run["qdq"]["residual_adds_fused"] == 10  # MobileNetV3-Large's ten residual blocks
    cam_run = json.loads((tiny_demo / "int8_cam_tensorrt" / "calibration_report.json").read_text())
    threshold = json.loads((tiny_demo / "semples" / "report.json").read_text())["background_threshold"]
    assert f"pseudo-masks from the CAMs at threshold {threshold}" in cam_run["gate_metric"]
