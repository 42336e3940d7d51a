"""``calibrate --target cpu`` with OpenVINO's candidates: NNCF's Q/DQ model, OpenVINO on the FP32 and
on ONNX Runtime's QDQ models, bf16 only where the CPU has it; and the candidate list without the extra."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from test_calibration import FAST, _labels, _val

import promptseg.calibration.config as config
from promptseg.calibration import CalibrationConfig, calibrate
from promptseg.calibration.images import ImageBatches, select_images
from promptseg.errors import ConfigError
from promptseg.runtime.backends import open_runner
from promptseg.runtime.spec import read_metadata

HAVE_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="openvino/nncf not installed (pip install promptseg[openvino])")
OPENVINO_NAMES = {c.name for c in config.OPENVINO_CANDIDATES}


def test_openvino_candidates_only_where_the_extra_is_installed(tiny_world, int8_segmenter, monkeypatch):
    options = {"model": str(int8_segmenter), "out": "unused", "data": str(tiny_world), "target": "cpu"}
    monkeypatch.setattr(config, "openvino_installed", lambda: False)
    names = {c.name for c in CalibrationConfig(**options).candidates}
    assert "fp32" in names and "qdq-u8-all" in names and not names & OPENVINO_NAMES
    with pytest.raises(ConfigError, match=r"cpu_candidates: nncf-u8 need openvino and nncf \| `pip install "
                                          r"promptseg\[openvino\]`"):
        CalibrationConfig(**options, cpu_candidates=("qdq-u8-all", "nncf-u8")).validate()
    monkeypatch.setattr(config, "openvino_installed", lambda: True)
    assert OPENVINO_NAMES <= {c.name for c in CalibrationConfig(**options).candidates}


@needs_extra
def test_nncf_quantizes_the_onnx_into_qdq_that_keeps_the_metadata(tiny_world, int8_segmenter, tmp_path):
    from promptseg.calibration.openvino import quantize_nncf

    meta = read_metadata(int8_segmenter)
    selection = select_images(data=str(tiny_world), images=None, split="train", gate_split="val", num=8, gate_num=1,
                              class_names=meta.class_names[1:])
    out = tmp_path / "nncf.onnx"
    model = quantize_nncf(int8_segmenter, out, ImageBatches(selection.calibration, batch=8), "u8", {"note": "x"})
    ops = [n.op_type for n in model.graph.node]
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(produced_by.get(n.input[0]) == "DequantizeLinear" for n in convs)  # every Conv in int8
    assert ops.count("DequantizeLinear") > ops.count("QuantizeLinear") > 0  # weights: DQ only
    assert ops[-1] == "ArgMax" and "QuantizeLinear" not in ops[-3:]  # the output tail stays float
    assert read_metadata(out) == meta.__class__(**{**meta.__dict__, "extra": {"note": "x"}})
    onnx.checker.check_model(onnx.load(str(out)))
    x = _val(tiny_world)[0][:8]
    with open_runner(out, "openvino") as runner:
        assert runner.precision == "int8"
        labels = runner.infer({"image": x})["labels"]
    assert (labels == _labels(int8_segmenter, x)).mean() > 0.9


@needs_extra
def test_cpu_target_gates_and_times_openvino_candidates_beside_onnxruntime(tiny_world, int8_segmenter,
                                                                           tmp_path):
    """NNCF's own model is left to the test above (its bias correction alone takes 20 s here)."""
    candidates = ("openvino-fp32", "openvino-bf16", "openvino-qdq-u8-all")
    report = calibrate(CalibrationConfig(model=str(int8_segmenter), out=str(tmp_path / "cpu"), data=str(tiny_world),
                                         target="cpu", cpu_candidates=candidates, max_drop=10.0, **FAST))
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == {"fp32", *candidates}
    assert {rows[n]["backend"] for n in candidates} == {"openvino"} and rows["fp32"]["backend"] == "onnxruntime"
    assert rows["openvino-qdq-u8-all"]["precision"] == "int8" and rows["openvino-fp32"]["precision"] == "fp32"
    bf16 = rows["openvino-bf16"]
    if "error" in bf16:  # a CPU without bf16 units: a row that says so instead of a second fp32 timing
        assert bf16["error"].startswith("precision bf16: bf16 asked for, but this CPU has no bf16 units")
        assert not bf16["passed"] and not bf16["chosen"]
    else:
        from promptseg.runtime.backends.openvino import cpu_capabilities, import_openvino

        assert "BF16" in cpu_capabilities(import_openvino().Core())
        assert bf16["precision"] == "bf16" and bf16["latency_ms"] > 0
    for name in ("openvino-fp32", "openvino-qdq-u8-all"):
        assert rows[name]["latency_ms"] > 0 and rows[name]["miou"] is not None
    # OpenVINO and ONNX Runtime compute the same FP32 model: the same labels, the same mIoU
    assert rows["openvino-fp32"]["label_agreement"] > 0.999
    assert abs(rows["openvino-fp32"]["miou"] - rows["fp32"]["miou"]) < 0.1
    assert "openvino" in report["latency"]["runtime"]
    chosen = rows[report["chosen"]]
    assert chosen["passed"] and report["backend"] == chosen["backend"] and report["precision"] == chosen["precision"]
    passed = [r for r in rows.values() if r["passed"] and r["name"] != "fp32"]
    fastest = min(passed, key=lambda r: r["latency_ms"])
    assert report["chosen"] in ("fp32", fastest["name"])
    if chosen["backend"] == "openvino":
        assert "with --backend openvino" in report["note"]
    written = tmp_path / "cpu" / "segmenter.cpu.onnx"
    x = _val(tiny_world)[0][:8]
    with open_runner(written, report["backend"]) as runner:
        labels = runner.infer({"image": x})["labels"]
    assert (labels == _labels(int8_segmenter, x)).mean() > 0.9
    assert np.isfinite(report["miou_fp32"])
