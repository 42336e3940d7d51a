from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from promptseg.cli import main
from promptseg.data.voc import VOCDataset
from promptseg.export.exporter import load_segmenter, parity_batches
from promptseg.export.parity import ParityBounds, ParityError, check_parity
from promptseg.export.text import fold_text_features, text_features_sha256
from promptseg.export.trt_ops import unsupported_ops
from promptseg.export.wrappers import CamForExport, SegmenterForExport
from promptseg.io import sha256_file
from promptseg.runtime.spec import CAM, SEGMENTER, ModelMetadata, read_metadata


@pytest.mark.parametrize("size_hw", [(64, 64), (61, 97)])
def test_export_wrappers_compute_what_training_computes(size_hw):
    """The graphs' modules on RGB 0..1 equal the trained networks on the ImageNet-normalised image the
    training code feeds them (the segmenter, and the CAM network's ReLU'd, peak-divided maps)."""
    from promptseg.train.cam_net import CamNet, CamNetConfig
    from promptseg.train.cams import imagenet_normalise
    from promptseg.train.seg import Segmenter

    torch.manual_seed(0)
    x = torch.rand(2, 3, *size_hw)
    segmenter = Segmenter("lraspp_mobilenet_v3_large", 3, 64).eval()
    with torch.no_grad():
        logits, labels = SegmenterForExport(segmenter)(x)
        want = segmenter(imagenet_normalise(x))
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(labels, want.argmax(1))
    cam_net = CamNet(CamNetConfig(), 3).eval()
    with torch.no_grad():
        cams, scores = CamForExport(cam_net)(x)
        raw = cam_net(imagenet_normalise(x))
    maps = torch.nn.functional.interpolate(raw.relu(), size=size_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(cams, maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-5), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(scores, torch.sigmoid(raw.mean(dim=(2, 3))))


@pytest.mark.parametrize("spec", [SEGMENTER, CAM], ids=lambda s: s.kind)
def test_graph_names_and_dynamic_axes_follow_the_spec(tiny_export, spec):
    model = onnx.load(str(tiny_export / spec.filename))
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    image_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert image_dims == ["batch", 3, "height", "width"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert 17 <= model.opset_import[0].version <= 20
    assert unsupported_ops(model) == []


def test_metadata_round_trips_and_matches_the_run(tiny_demo, tiny_export):
    classes = VOCDataset(tiny_demo / "data", "train").class_names
    seg = read_metadata(tiny_export / "segmenter.onnx")
    cam = read_metadata(tiny_export / "cam.onnx")
    assert seg.class_names == ("background", *classes) and cam.class_names == classes
    assert seg.kind == "segmenter" and cam.kind == "cam" and seg.method == cam.method == "semples"
    assert seg.input_size == (64, 64)
    # the CAM graph carries the run's background threshold (its INT8 gate makes pseudo-masks at it)
    cam_report = json.loads((tiny_demo / "semples" / "report.json").read_text())
    assert float(cam.extra["cam_threshold"]) == cam_report["background_threshold"] and "cam_threshold" not in seg.extra
    features = np.load(tiny_export / "text_features.npy")
    assert seg.text_features_sha256 == cam.text_features_sha256 == text_features_sha256(features)
    assert ModelMetadata.from_props(seg.to_props()) == seg
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tiny_export / name)
    assert manifest["text_features"]["sha256"] == seg.text_features_sha256


def test_missing_metadata_is_a_clear_error(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(Exception, match="not a promptseg export .*promptseg.kind"):
        read_metadata(path)


def test_parity_report_meets_the_gate(tiny_export):
    report = json.loads((tiny_export / "export_report.json").read_text())
    for name in ("segmenter.onnx", "cam.onnx"):
        entry = report["files"][name]
        assert entry["parity"] == "passed"
        assert entry["max_abs_diff"] <= 1e-3 and entry["label_agreement"] >= 0.999 and entry["images"] == 16


def test_parity_gate_fails_when_a_weight_changes_after_export(tiny_demo, tiny_export):
    segmenter, _ = load_segmenter(tiny_demo / "seg_semples")
    module = SegmenterForExport(segmenter)
    batches = parity_batches(str(tiny_demo / "data"), "val", 8)
    check_parity(module, tiny_export / "segmenter.onnx", SEGMENTER, batches, ParityBounds())  # as exported
    with torch.no_grad():
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.mul_(1.5)
    with pytest.raises(ParityError, match=r"segmenter.onnx: PyTorch and ONNX Runtime disagree .*max \|diff\|") as err:
        check_parity(module, tiny_export / "segmenter.onnx", SEGMENTER, batches, ParityBounds())
    assert err.value.result["max_abs_diff"] > 1e-3


def test_parity_gate_fails_on_nan_outputs(tiny_demo, tiny_export):
    module = SegmenterForExport(load_segmenter(tiny_demo / "seg_semples")[0])
    batches = parity_batches(str(tiny_demo / "data"), "val", 4)
    with torch.no_grad():
        next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d)).weight.fill_(float("nan"))
    with pytest.raises(ParityError, match=r"max \|diff\| nan") as err:
        check_parity(module, tiny_export / "segmenter.onnx", SEGMENTER, batches, ParityBounds())
    assert np.isnan(err.value.result["max_abs_diff"])


def test_folded_semples_features_equal_the_training_code(tiny_demo, tiny_export):
    from promptseg.train.methods import load_text_features

    saved = load_text_features(tiny_demo / "semples" / "stage_b")["text_features"].numpy()
    exported = np.load(tiny_export / "text_features.npy")
    np.testing.assert_allclose(exported, saved, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(exported, axis=1), 1.0, atol=1e-6)


def test_folded_clims_features_are_the_class_prompts(tiny_demo):
    from promptseg.train.clip import ClipSpec, encode_prompts

    folded = fold_text_features(tiny_demo / "clims")
    config = json.loads((tiny_demo / "clims" / "config.json").read_text())
    guide = config["guidance"]
    model, tokenizer = ClipSpec(guide["clip_model"], guide["clip_pretrained"]).load()
    with torch.no_grad():
        live = encode_prompts(model, tokenizer, [guide["class_template"].format(c) for c in folded.class_names])
    np.testing.assert_allclose(folded.features, live.numpy(), atol=1e-6, rtol=0)
    assert fold_text_features(tiny_demo / "baseline") is None


def test_exported_graphs_run_in_a_process_without_torch(tiny_export):
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'open_clip'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
for name in ('segmenter.onnx', 'cam.onnx'):
    s = ort.InferenceSession({str(tiny_export)!r} + '/' + name, providers=['CPUExecutionProvider'])
    outs = s.run(None, {{'image': np.random.rand(2, 3, 48, 40).astype(np.float32)}})
    print(name, [o.shape for o in outs])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "segmenter.onnx [(2, 7, 48, 40), (2, 48, 40)]" in done.stdout
    assert "cam.onnx [(2, 6, 48, 40), (2, 6)]" in done.stdout


def test_unsupported_ops_are_named():
    nodes = [onnx.helper.make_node("QLinearConv", list("abcdefgh"), ["y"]), onnx.helper.make_node("Relu", ["y"], ["z"])]
    graph = onnx.helper.make_graph(nodes, "g", [], [])
    assert unsupported_ops(onnx.helper.make_model(graph)) == ["QLinearConv"]


def test_export_cli_names_a_missing_stage(tiny_demo, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny_demo), "--method", "pole", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "seg_pole: not found" in result.output


@pytest.mark.parametrize("size_hw", [(40, 48), (61, 97)])
def test_exported_graphs_equal_the_trained_networks_at_odd_sizes(tiny_demo, tiny_export, size_hw):
    """The ONNX against the training code's own forward (not the export wrapper), at sizes that resize."""
    import onnxruntime as ort

    from promptseg.train.cams import imagenet_normalise, infer_cams
    from promptseg.train.pseudo import load_cam_run

    rng = np.random.default_rng(sum(size_hw))
    images = rng.integers(0, 256, (2, *size_hw, 3), dtype=np.uint8)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    segmenter, _ = load_segmenter(tiny_demo / "seg_semples")
    with torch.no_grad():
        expected = segmenter(imagenet_normalise(torch.from_numpy(x))).numpy()
    session = ort.InferenceSession(str(tiny_export / "segmenter.onnx"), providers=["CPUExecutionProvider"])
    logits, labels = session.run(["logits", "labels"], {"image": x})
    assert logits.shape == expected.shape == (2, expected.shape[1], *size_hw)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    assert (labels == expected.argmax(1)).mean() >= 0.999
    net, _, _ = load_cam_run(tiny_demo / "semples")
    cams = infer_cams(net, images, np.ones((2, net.num_classes)), scales=(1.0,), flip=False)
    session = ort.InferenceSession(str(tiny_export / "cam.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["cams"], {"image": x})[0]
    np.testing.assert_allclose(got, cams, atol=1e-4)


def test_the_manifest_lists_only_what_this_export_wrote(tiny_demo, tmp_path):
    from promptseg.export import ExportConfig, export_run

    (tmp_path / "old_segmenter.onnx").write_bytes(b"an earlier export's file")
    export_run(ExportConfig(run=str(tiny_demo), out=str(tmp_path), method="semples"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"segmenter.onnx", "cam.onnx", "text_features.npy"}
