"""INT8 calibration: option checks, image choice, the TensorRT and CPU targets, and a gate that fails.

One small LR-ASPP segmenter (trained for a few steps on the tiny world's ground truth, so its labels
mean something) is exported once per session; every calibration here takes a few seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image

from promptseg.calibration import CalibrationConfig, CalibrationGateError, calibrate, output_name
from promptseg.calibration.images import ImageBatches, folder_images, select_images, spread
from promptseg.calibration.quantize import output_tail
from promptseg.errors import ConfigError, DataError
from promptseg.runtime.spec import read_metadata

FAST = {"num": 16, "gate_num": 16, "latency_runs": 3, "latency_batch": 2, "batch": 8}


@pytest.fixture(scope="session")
def calib_model(tiny_world, tmp_path_factory) -> Path:
    """segmenter.onnx of an LR-ASPP (input 64) whose labels mean something, made in seconds.

    Training end to end takes minutes on two cores, so: random backbone, batch-norm statistics
    from one pass over the train images, and the two 1x1 classifier convolutions fitted in closed
    form (ridge regression of one-hot labels on their input features). Val mIoU lands near 20%,
    enough for labels that depend on the image and a gate that can fail.
    """
    import torch
    import torch.nn.functional as F

    from promptseg import __version__
    from promptseg.data.voc import VOCDataset
    from promptseg.export.onnx_export import export_onnx
    from promptseg.export.wrappers import SegmenterForExport
    from promptseg.runtime.spec import SEGMENTER, ModelMetadata
    from promptseg.train.cams import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalise
    from promptseg.train.seg import Segmenter

    torch.manual_seed(0)
    train = VOCDataset(tiny_world, "train")
    x = torch.from_numpy(np.stack([s.load_image() for s in train])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.stack([s.load_mask() for s in train]).astype(np.int64))
    num_classes = train.num_classes + 1
    model = Segmenter("lraspp_mobilenet_v3_large", train.num_classes, 64)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the pass
    feats = {}
    head = model.net.classifier
    hooks = [head.low_classifier.register_forward_hook(lambda m, i, o: feats.__setitem__("low", i[0])),
             head.high_classifier.register_forward_hook(lambda m, i, o: feats.__setitem__("high", i[0]))]
    with torch.no_grad():
        model.train()(imagenet_normalise(x))
        model.eval()(imagenet_normalise(x))
    for hook in hooks:
        hook.remove()
    low, high = feats["low"], feats["high"]
    target = F.interpolate(y[:, None].float(), size=low.shape[-2:], mode="nearest").reshape(-1).long()
    features = torch.cat([low, high, torch.ones_like(low[:, :1])], 1).permute(0, 2, 3, 1)
    features = features.reshape(-1, features.shape[-1]).double()
    keep = target != 255
    features, target = features[keep], target[keep]
    weight = torch.where(target == 0, 0.1, 1.0).double()[:, None]
    gram = features.T @ (features * weight) + 1e-2 * torch.eye(features.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, features.T @ (F.one_hot(target, num_classes).double() * weight)).float()
    n_low, n_high = low.shape[1], high.shape[1]
    with torch.no_grad():
        head.low_classifier.weight.copy_(solution[:n_low].T[:, :, None, None])
        head.low_classifier.bias.copy_(solution[-1])
        head.high_classifier.weight.copy_(solution[n_low:n_low + n_high].T[:, :, None, None])
        head.high_classifier.bias.zero_()
    names = ("background", *train.class_names)
    palette = tuple((int(k * 40) % 256, int(k * 90) % 256, int(k * 150) % 256) for k in range(len(names)))
    meta = ModelMetadata(kind="segmenter", class_names=names, palette=palette, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, input_size=(64, 64), method="test", promptseg_version=__version__)
    path = tmp_path_factory.mktemp("calib_model") / "segmenter.onnx"
    export_onnx(SegmenterForExport(model.eval()), SEGMENTER, meta, torch.rand(2, 3, 64, 64), path)
    return path


def _labels(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["labels"], {"image": x})[0]


def _val_batch(world: Path, count: int = 8) -> np.ndarray:
    ids = (world / "ImageSets/Segmentation/val.txt").read_text().split()[:count]
    images = [np.asarray(Image.open(world / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids]
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255


# ----------------------------------------------------------------------------- options and images


@pytest.mark.parametrize("change, match", [
    ({"method": "kl"}, "method: got 'kl' | expected one of minmax, entropy, percentile"),
    ({"target": "gpu"}, "target: got 'gpu'"),
    ({"num": 0}, "num: got 0 | expected >= 1"),
    ({"data": None}, "expected --data DIR or --images DIR"),
    ({"cpu_candidates": ("qop-u4",)}, "cpu_candidates: got \\['qop-u4'\\]"),
    ({"max_drop": -1.0}, "max_drop: got -1.0"),
], ids=["method", "target", "num", "no-images", "candidate", "max-drop"])
def test_bad_options_fail_before_any_work(tiny_world, calib_model, tmp_path, change, match):
    options = {"model": str(calib_model), "out": str(tmp_path / "out"), "data": str(tiny_world), **change}
    with pytest.raises(ConfigError, match=match):
        calibrate(CalibrationConfig(**options))
    assert not (tmp_path / "out").exists()


def test_calibration_and_gate_images_are_disjoint_and_deterministic(tiny_world):
    classes = tuple(json.loads((tiny_world / "classes.json").read_text())["names"])
    same = select_images(data=str(tiny_world), images=None, split="val", gate_split="val", num=10, gate_num=100,
                         class_names=classes)
    calib_ids, gate_ids = [r.id for r in same.calibration], [r.id for r in same.gate]
    assert len(calib_ids) == 10 and len(gate_ids) == 32 - 10 and not set(calib_ids) & set(gate_ids)
    assert same.gate_has_masks
    again = select_images(data=str(tiny_world), images=None, split="val", gate_split="val", num=10, gate_num=100,
                          class_names=classes)
    assert [r.id for r in again.calibration] == calib_ids
    other = select_images(data=str(tiny_world), images=None, split="train", gate_split="val", num=20, gate_num=8,
                          class_names=classes)
    assert len(other.gate) == 8 and other.gate_source["split"] == "val" and other.calibration_source["split"] == "train"
    assert spread(4, 10) == [0, 2, 5, 7] and spread(10, 10) == list(range(10))


def test_too_few_images_is_an_error(tiny_world):
    classes = tuple(json.loads((tiny_world / "classes.json").read_text())["names"])
    with pytest.raises(DataError, match="32 calibration images | expected at least 64"):
        select_images(data=str(tiny_world), images=None, split="val", gate_split="train", num=64, gate_num=8,
                      class_names=classes)
    with pytest.raises(DataError, match="no held-out images left"):
        select_images(data=str(tiny_world), images=None, split="val", gate_split="val", num=32, gate_num=8,
                      class_names=classes)
    with pytest.raises(DataError, match="classes .* expected the model's"):
        select_images(data=str(tiny_world), images=None, split="val", gate_split="val", num=4, gate_num=8,
                      class_names=("cat", "dog"))


def test_unreadable_images_are_named_before_calibration(tiny_world, calib_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(np.full((40, 48, 3), 30 * k, np.uint8)).save(folder / f"ok_{k}.png")
    (folder / "broken_a.jpg").write_bytes(b"not a jpeg")
    (folder / "broken_b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"2 of 8 images unreadable:(?s:.*)broken_a\.jpg(?s:.*)broken_b\.png"):
        ImageBatches(folder_images(folder)).check()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="broken_a.jpg"):
        calibrate(CalibrationConfig(model=str(calib_model), out=str(out), images=str(folder), data=str(tiny_world),
                                    num=8, **{k: v for k, v in FAST.items() if k != "num"}))
    assert not (out / "calibration_cache.json").exists()  # stopped before the calibration pass


def test_batches_are_what_the_runtime_feeds(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, size in enumerate([(40, 48), (40, 48), (64, 32), (40, 48), (2000, 100)]):
        Image.fromarray(np.full((*size, 3), 50 + k, np.uint8)).save(folder / f"{k}.png")
    batches = ImageBatches(folder_images(folder), batch=2, max_side=1024).check()
    shapes = [b["image"].shape for b in batches]
    assert shapes == [(2, 3, 40, 48), (1, 3, 64, 32), (1, 3, 40, 48), (1, 3, 1024, 51)]
    first = next(iter(batches))["image"]
    assert first.dtype == np.float32 and np.allclose(first[0, :, 0, 0], 50 / 255)
    assert [b["image"].shape for b in batches] == shapes  # re-iterable


def test_output_tail_is_the_head_merge_resizes_and_argmax(calib_model):
    model = onnx.load(str(calib_model))
    by_name = {n.name: n.op_type for n in model.graph.node}
    tail = sorted(by_name[name] for name in output_tail(model))
    assert tail == ["Add", "ArgMax", "Resize", "Resize"]


# ----------------------------------------------------------------------------- targets


def test_tensorrt_target_is_symmetric_int8_qdq_and_deterministic(tiny_world, calib_model, tmp_path):
    from promptseg.export.trt_ops import unsupported_ops

    # the graph's form is under test here; on 16 gate images the tiny model's drop swings by a few points
    cfg = CalibrationConfig(model=str(calib_model), out=str(tmp_path / "a"), data=str(tiny_world), target="tensorrt",
                            max_drop=5.0, **FAST)
    report = calibrate(cfg)
    path = tmp_path / "a" / output_name(calib_model, cfg.target)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 60
    for node in qdq:  # every zero point present, int8, and 0
        zero = inits[node.input[2]]
        assert zero.data_type == onnx.TensorProto.INT8, node.name
        assert not numpy_helper.to_array(zero).any(), node.name
    assert unsupported_ops(model) == []
    assert not {n.op_type for n in model.graph.node} & {"QLinearConv", "ConvInteger", "MatMulInteger"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers.get(c.input[0]) == "DequantizeLinear" and producers.get(c.input[1]) == "DequantizeLinear"
               for c in convs)  # activation and weight of every convolution quantised
    assert all(c.input[2] in inits and inits[c.input[2]].data_type == onnx.TensorProto.FLOAT
               for c in convs if len(c.input) > 2)  # biases stay float
    assert report["qdq"]["residual_adds_fused"] == 10  # MobileNetV3-Large's ten residual blocks
    assert not any(producers.get(i) == "QuantizeLinear" for n in model.graph.node for i in n.input
                   if n.op_type in ("Resize", "ArgMax"))
    # metadata travels, the runtime can read it; the report has what the issue asks for
    meta = read_metadata(path)
    assert meta.class_names == read_metadata(calib_model).class_names and meta.extra["precision"] == "int8"
    for key in ("method", "target", "num_images", "candidates", "miou_fp32", "miou_int8", "label_agreement"):
        assert key in report
    assert report["num_images"] == 16 and report["gate_passed"] and report["gate"]["ground_truth"]
    assert not set(report["calibration"]["ids"]) & set(report["gate"]["ids"])
    assert abs(report["miou_fp32"] - report["miou_int8"]) <= cfg.max_drop and report["label_agreement"] > 0.9
    assert [c["name"] for c in report["candidates"]] == ["fp32", "tensorrt-qdq-s8"]
    assert all(c["latency_ms"] > 0 for c in report["candidates"])
    on_disk = json.loads((tmp_path / "a" / "calibration_report.json").read_text())
    assert on_disk["miou_int8"] == report["miou_int8"]
    cache = json.loads((tmp_path / "a" / "calibration_cache.json").read_text())
    assert cache["method"] == "minmax" and len(cache["tensors"]) > 50
    assert all(t["amax"] >= 0 and abs(t["int8_scale"] - t["amax"] / 127) < 1e-9 for t in cache["tensors"].values())
    # INT8 labels stay close to FP32's on images it never saw
    x = _val_batch(tiny_world)
    assert (_labels(path, x) == _labels(calib_model, x)).mean() > 0.9
    # the same inputs give the same bytes
    calibrate(replace(cfg, out=str(tmp_path / "b")))
    assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes()


def test_cpu_target_measures_candidates_and_keeps_fp32_when_int8_is_not_faster(tiny_world, calib_model, tmp_path):
    # images only: no masks, so the gate scores INT8 against the FP32 labels
    options = {"model": str(calib_model), "images": str(tiny_world / "JPEGImages"), "target": "cpu",
               "cpu_candidates": ("qop-u8-all", "qdq-u8-conv"), "max_drop": 10.0, **FAST}
    report = calibrate(CalibrationConfig(out=str(tmp_path / "cpu"), **options))
    rows = {c["name"]: c for c in report["candidates"]}
    assert set(rows) == {"fp32", "qop-u8-all", "qdq-u8-conv"}
    assert all(r["latency_ms"] > 0 and r["latency_ms_batch1"] > 0 for r in rows.values())
    assert report["miou_fp32"] is None and not report["gate"]["ground_truth"]
    assert "no ground truth" in report["gate_metric"]
    chosen = rows[report["chosen"]]
    assert chosen["chosen"] and chosen["passed"]
    if report["chosen"] != "fp32":  # whichever won must be the fastest that passed and beat FP32
        assert chosen["latency_ms"] * 1.05 <= rows["fp32"]["latency_ms"]
    out_model = tmp_path / "cpu" / "segmenter.cpu.onnx"
    x = _val_batch(tiny_world)
    assert (_labels(out_model, x) == _labels(calib_model, x)).mean() > 0.9
    # demanding a 1000x speed-up leaves FP32 as the only sensible choice, and the tool says so
    slow = calibrate(CalibrationConfig(out=str(tmp_path / "fp32"), min_speedup=1000.0,
                                       **{**options, "cpu_candidates": ("qop-u8-all",)}))
    assert slow["chosen"] == "fp32" and slow["precision"] == "fp32" and "INT8 cannot beat FP32" in slow["note"]
    assert (tmp_path / "fp32" / "segmenter.cpu.onnx").read_bytes() == calib_model.read_bytes()


def test_gate_fails_when_calibrated_on_the_wrong_images(tiny_world, calib_model, tmp_path):
    from promptseg.cli import main

    dark = tmp_path / "flat"
    dark.mkdir()
    for k in range(8):  # flat grey frames: every range collapses to a point, real images then saturate
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(dark / f"{k}.png")
    out = tmp_path / "out"
    (out).mkdir()
    stale = out / "segmenter.tensorrt.onnx"
    stale.write_bytes(b"from an earlier run")
    with pytest.raises(CalibrationGateError, match="accuracy gate failed") as info:
        calibrate(CalibrationConfig(model=str(calib_model), out=str(out), images=str(dark), data=str(tiny_world),
                                    **{**FAST, "num": 8}))
    report = info.value.report
    assert not report["gate_passed"] and report["output"] is None and report["miou_drop"] > 3.0
    assert json.loads((out / "calibration_report.json").read_text())["gate_passed"] is False
    assert not stale.exists()
    result = CliRunner().invoke(main, ["calibrate", str(calib_model), "--images", str(dark), "--data", str(tiny_world),
                                       "--num", "8", "--gate-num", "16", "--latency-runs", "2", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Error: accuracy gate failed" in result.output and "tensorrt-qdq-s8" in result.output


def test_latency_times_each_model_in_blocks_and_keeps_its_better_block():
    from promptseg.calibration.gate import measure_latency

    calls: list[str] = []

    class Slow:  # a session whose run takes `seconds`, the first block 10x longer (a burst of load)
        def __init__(self, name, seconds):
            self.name, self.seconds, self.runs = name, seconds, 0

        def run(self, _, feed):
            import time

            calls.append(self.name)
            self.runs += 1
            time.sleep(self.seconds * (10 if self.runs <= 5 else 1))

    sessions = {"a": Slow("a", 0.01), "b": Slow("b", 0.03)}
    x = np.zeros((2, 3, 4, 4), np.float32)
    result = measure_latency(sessions, {2: x}, runs=4, warmup=1)
    assert calls == ["a"] * 5 + ["b"] * 5 + ["b"] * 5 + ["a"] * 5  # blocks, then the reverse order
    for name, seconds in (("a", 0.01), ("b", 0.03)):
        per_image_ms = 1000 * seconds / 2
        assert per_image_ms <= result[name][2]["median"] < 3 * per_image_ms  # the unloaded block wins
        assert result[name][2]["min"] <= result[name][2]["median"]
