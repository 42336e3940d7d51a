"""The OpenVINO backend's own logic: the compile plan per requested precision and CPU capability
(no openvino needed), the precision read back from the compiled model, bf16 on a CPU with and
without bf16 units (the capability check faked both ways), a missing openvino, and bench, compare
and infer through the CLI next to ONNX Runtime. The shared runner checks (bad inputs, shapes, the
graph spec) run over both backends in test_runtime.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_runtime import qdq_in_float
from test_runtime_models import tiny_segmenter

import promptseg.runtime.backends.openvino as ov_backend
from promptseg.cli import main
from promptseg.data.synth import SynthConfig, write_world
from promptseg.data.voc import VOCDataset
from promptseg.errors import PromptsegError
from promptseg.runtime.backends import BackendOptions, InferenceError, open_runner
from promptseg.runtime.backends.openvino import CompilePlan, plan_compile

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO,
                                    reason="openvino not installed (pip install promptseg[openvino])")
AVX2 = ("FP32", "INT8", "BIN", "EXPORT_IMPORT")  # what OpenVINO lists on this project's AVX2 machine
AMX = ("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openvino_models")
    return {"fp32": tiny_segmenter(root / "seg.onnx"), "int8": tiny_segmenter(root / "seg_int8.onnx", "int8"),
            "fp16": tiny_segmenter(root / "seg_fp16.onnx", "fp16")}


def _image(n=1, h=20, w=30, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


def _real_has_bf16() -> bool:
    import openvino

    return "BF16" in ov_backend.cpu_capabilities(openvino.Core())


# ----------------------------------------------------------------------------- compile plans


@pytest.mark.parametrize(("requested", "graph", "capabilities", "plan"), [
    (None, "fp32", AVX2, CompilePlan("fp32", "f32")),
    ("fp32", "fp32", AMX, CompilePlan("fp32", "f32")),  # OpenVINO's own default there would be bf16
    ("bf16", "fp32", AMX, CompilePlan("bf16", "bf16")),
    ("bf16", "fp32", AVX2, CompilePlan("fp32", "f32", "bf16 asked for, but this CPU has no bf16 units (OpenVINO "
                                                      "CPU capabilities: FP32, INT8, BIN, EXPORT_IMPORT): ran fp32")),
    (None, "int8", AVX2, CompilePlan("int8", "f32")),
    ("int8", "int8", AMX, CompilePlan("int8", "bf16", "Q/DQ layers int8, the float layers bf16")),
], ids=["default", "fp32-on-amx", "bf16-on-amx", "bf16-on-avx2", "int8", "int8-on-amx"])
def test_compile_plan_follows_the_cpus_capabilities(requested, graph, capabilities, plan):
    assert plan_compile(requested, graph, capabilities) == plan


@pytest.mark.parametrize(("requested", "graph", "match"), [
    ("int8", "fp32", r"precision int8: the ONNX is fp32 with no Q/DQ nodes \| expected a quantized \(QDQ\) ONNX"),
    ("fp32", "int8", r"precision fp32: the ONNX has Q/DQ nodes, which OpenVINO runs as int8"),
    ("bf16", "int8", r"precision bf16: the ONNX has Q/DQ nodes"),
    (None, "fp16", r"the ONNX is FP16-cast \| expected the FP32 ONNX"),
    ("fp16", "fp32", r"precision: got 'fp16' \| expected one of fp32, bf16, int8 \(OpenVINO on the CPU\)"),
])
def test_compile_plan_refuses_what_the_onnx_cannot_give(requested, graph, match):
    with pytest.raises(PromptsegError, match=match):
        plan_compile(requested, graph, AMX)


def test_a_missing_openvino_is_a_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(PromptsegError, match=r"openvino not installed: `pip install promptseg\[openvino\]`"):
        open_runner(models["fp32"], "openvino").activate()
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["infer", str(models["fp32"]), str(tmp_path / "a.png"), "--out",
                                       str(tmp_path / "o"), "--backend", "openvino"])
    assert result.exit_code == 1 and "Error: openvino not installed" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- the compiled model


@needs_openvino
def test_precision_is_read_back_from_the_compiled_model(models):
    with open_runner(models["fp32"], "openvino") as fp32, open_runner(models["int8"], "openvino") as int8:
        assert fp32.precision == "fp32" and int8.precision == "int8"
        assert ov_backend.runtime_precision(int8._compiled) == "int8"  # its convolution runs u8 x s8
    with pytest.raises(PromptsegError, match="precision int8: the ONNX is fp32"):
        open_runner(models["fp32"], "openvino", BackendOptions(precision="int8")).activate()
    with pytest.raises(PromptsegError, match="the ONNX is FP16-cast"):
        open_runner(models["fp16"], "openvino").activate()


def _recorded_compiles(monkeypatch, capabilities: tuple[str, ...]) -> list[dict]:
    """Fake the CPU's capabilities; return the list the compile properties are recorded in."""
    configs = []
    real = ov_backend.compile_config

    def record(plan, threads):
        configs.append(real(plan, threads))
        return configs[-1]

    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda core: capabilities)
    monkeypatch.setattr(ov_backend, "compile_config", record)
    return configs


@needs_openvino
def test_bf16_on_a_cpu_without_bf16_units_runs_fp32_and_says_so(models, monkeypatch):
    configs = _recorded_compiles(monkeypatch, AVX2)
    with open_runner(models["fp32"], "openvino", BackendOptions(precision="bf16", threads=1)) as runner:
        assert runner.precision == "fp32"
        assert runner.precision_note.startswith("bf16 asked for, but this CPU has no bf16 units")
        assert runner._compiled.get_property("INFERENCE_NUM_THREADS") == 1
        out = runner.infer({"image": _image()})
    assert configs == [{"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1}]
    with open_runner(models["fp32"]) as reference:
        np.testing.assert_allclose(out["logits"], reference.infer({"image": _image()})["logits"], atol=1e-4)


@needs_openvino
def test_bf16_where_the_cpu_lists_it_is_asked_for_and_what_ran_is_reported(models, monkeypatch):
    """The plan asks OpenVINO for bf16; the precision reported is what the compiled model runs, so on
    a CPU that only claimed BF16 (faked here, on a machine without it) the runner says fp32."""
    real_has_bf16 = _real_has_bf16()
    configs = _recorded_compiles(monkeypatch, AMX)
    with open_runner(models["fp32"], "openvino", BackendOptions(precision="bf16")) as runner:
        out = runner.infer({"image": _image()})
        precision, note = runner.precision, runner.precision_note
    assert configs[0]["INFERENCE_PRECISION_HINT"] == "bf16"
    with open_runner(models["fp32"]) as reference:
        diff = np.abs(out["logits"] - reference.infer({"image": _image()})["logits"]).max()
    if real_has_bf16:
        assert precision == "bf16" and note == "" and 0 < diff < 0.1  # 8 mantissa bits, 27-term sums
    else:
        assert precision == "fp32" and note == "OpenVINO ran fp32 where bf16 was planned" and diff < 1e-4


@needs_openvino
def test_full_range_int8_weights_stay_close_where_the_cpu_saturates_int16(models):
    """u8 x s8 pairs of full-range weights overflow int16 in AVX2's vpmaddubsw (CPUs without VNNI):
    OpenVINO's result departs from the exact Q/DQ arithmetic there (0.26 logits on this machine's
    AVX2; exact with 7-bit weights, test_runtime.py) but must stay close and keep the labels."""
    x = _image(2, 32, 32, seed=1)
    with open_runner(models["int8"], "openvino") as runner:
        out = runner.infer({"image": x})
    exact = qdq_in_float(models["int8"], x)
    assert np.abs(out["logits"] - exact).max() < 0.3
    assert (out["labels"] == exact.argmax(1)).mean() > 0.99


@needs_openvino
def test_an_openvino_failure_is_an_inference_error_without_its_source_locations(models):
    class Failing:
        def infer(self, feed, share_inputs=False):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224:\n"
                               "Check 'getShape().isCompatible(dims)' failed at src/plugins/cpu.h:99:\n"
                               "ParameterMismatch: Can not clone with new dims.\n")

    with open_runner(models["fp32"], "openvino") as runner:
        runner._request = Failing()
        with pytest.raises(InferenceError, match=r"openvino:seg.onnx: OpenVINO failed on image \(1, 3, 20, 30\) "
                                                 r"\(ParameterMismatch: Can not clone with new dims.\)$"):
            runner.infer({"image": _image()})


# ----------------------------------------------------------------------------- CLI beside ONNX Runtime


def _run(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@needs_openvino
def test_bench_gives_a_row_per_backend_with_the_precision_that_ran(models, tmp_path):
    out = tmp_path / "rows.json"
    result = _run(["bench", models["fp32"], "--backend", "onnxruntime", "--backend", "openvino", "--precision",
                   "bf16", "--warmup", "1", "--iters", "3", "--threads", "1", "--out", out])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in rows] == [("onnxruntime", 1), ("openvino", 1)]
    ort_row, ov_row = rows
    assert ort_row["precision"] == "fp32" and ort_row["precision_note"] == ""  # ONNX Runtime runs the graph
    assert ov_row["input_shape"] == [1, 3, 32, 32] and 0 < ov_row["p50_ms"] <= ov_row["max_ms"]
    if _real_has_bf16():
        assert ov_row["precision"] == "bf16" and ov_row["precision_note"] == ""
    else:
        assert ov_row["precision"] == "fp32" and "no bf16 units" in ov_row["precision_note"]
        assert "note: seg.onnx on openvino, batch 1: bf16 asked for, but this CPU has no bf16 units" in result.output
    assert "| seg.onnx | openvino |" in result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openvino_world")
    write_world(root, SynthConfig(seed=5, train=2, val=6, clip_images=0))
    return root


@needs_openvino
def test_compare_and_infer_agree_with_onnxruntime(world, tmp_path):
    names = ("background", *VOCDataset(world, "val").class_names)
    model = tiny_segmenter(tmp_path / "a.onnx", class_names=names)
    result = _run(["compare", model, model, "--data", world, "--backend-a", "onnxruntime", "--backend-b", "openvino",
                   "--out", tmp_path / "cmp.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert report["model_b"]["backend"] == "openvino" and report["model_b"]["precision"] == "fp32"
    assert report["label_agreement"] >= 0.995 and report["logits"]["max_abs_diff"] < 1e-3
    assert abs(report["miou_delta"]) < 0.005
    images = world / "JPEGImages"
    result = _run(["infer", model, images, "--out", tmp_path / "ov", "--backend", "openvino", "--batch", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ov" / "summary.json").read_text())
    assert summary["backend"] == "openvino" and summary["succeeded"] == len(list(images.iterdir()))
    reference = _run(["infer", model, images, "--out", tmp_path / "ort"])
    assert reference.exit_code == 0, reference.output
    for mask in (tmp_path / "ort" / "masks").iterdir():
        np.testing.assert_array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "ov" / "masks"
                                                                                          / mask.name)))
