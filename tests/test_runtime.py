"""The runtime's Python API on tiny generated models: input checks, the runner lifecycle, the CPU
backends (ONNX Runtime; OpenVINO where it is installed) through the same checks, host processing,
and a torch-free run in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from test_runtime_models import CLASSES, tiny_cam, tiny_segmenter

from promptseg.errors import DataError, PromptsegError
from promptseg.runtime.backends import BackendOptions, check_feed, open_runner
from promptseg.runtime.backends.onnxrt import resolve_providers
from promptseg.runtime.engine_cache import ShapeProfile
from promptseg.runtime.processing import fit_sides
from promptseg.runtime.sources import check_pixels, collect_inputs, output_names
from promptseg.runtime.spec import IMAGE, MAX_SIDE, MIN_SIDE

ROOT = Path(__file__).resolve().parents[1]
# every backend that runs on this machine's CPU goes through the same runner checks
CPU_BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino not installed (pip install promptseg[openvino])"))]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime_models")
    return {"fp32": tiny_segmenter(root / "seg.onnx"), "int8": tiny_segmenter(root / "seg_int8.onnx", "int8"),
            "int8_7bit": tiny_segmenter(root / "seg_int8_7bit.onnx", "int8", weight_levels=63),
            "cam": tiny_cam(root / "cam.onnx")}


def _image(n=1, h=20, w=30, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


# ----------------------------------------------------------------------------- input checks


BAD_FEEDS = pytest.mark.parametrize(("feed", "match"), [
    ({"img": _image()}, r"inputs: got \['img'\] \| expected \['image'\]"),
    ({"image": _image(), "extra": _image()}, r"inputs: got \['extra', 'image'\]"),
    ({"image": _image().astype(np.float64)}, r"input 'image': got dtype float64 \| expected float32"),
    ({"image": _image()[0]}, r"input 'image': got shape \(3, 20, 30\) \| expected \(batch, 3, height, width\)"),
    ({"image": np.zeros((1, 4, 8, 8), np.float32)}, r"got shape \(1, 4, 8, 8\) \| expected \(batch, 3,"),
    ({"image": np.zeros((0, 3, 8, 8), np.float32)}, r"got shape \(0, 3, 8, 8\)"),
    ({"image": [[0.0]]}, r"input 'image': got list \| expected a numpy array"),
], ids=["name", "extra", "dtype", "rank", "channels", "empty", "type"])


@BAD_FEEDS
def test_bad_inputs_name_the_tensor_what_came_and_what_was_expected(feed, match):
    with pytest.raises(PromptsegError, match=match):
        check_feed(feed, [IMAGE])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@BAD_FEEDS
def test_every_backend_refuses_bad_inputs_with_the_same_message(models, backend, feed, match):
    """The specs a backend reads from its own session must give the checks above (a backend that
    read the input as static, or as float64, would refuse good feeds or pass bad ones)."""
    with open_runner(models["fp32"], backend) as runner:
        assert runner.input_specs() == (IMAGE,)
        with pytest.raises(PromptsegError, match=match):
            runner.infer(feed)


def test_profile_bounds_are_checked_with_the_range_in_the_message():
    bounds = ((1, 3, 16, 16), (4, 3, 64, 64))
    check_feed({"image": np.zeros((4, 3, 16, 64), np.float32)}, [IMAGE], lambda name: bounds)
    with pytest.raises(PromptsegError, match=r"got shape \(1, 3, 300, 300\) \| expected \(1\.\.4, 3, 16\.\.64, "
                                             r"16\.\.64\) \(the engine's optimisation profile\)"):
        check_feed({"image": np.zeros((1, 3, 300, 300), np.float32)}, [IMAGE], lambda name: bounds)


# ----------------------------------------------------------------------------- runner lifecycle


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_runner_must_be_active_and_is_a_context_manager(models, backend):
    runner = open_runner(models["fp32"], backend)
    with pytest.raises(PromptsegError, match="not active"):
        runner.infer({"image": _image()})
    with runner:
        assert runner.is_active
        with pytest.raises(PromptsegError, match="already active"):
            runner.activate()
        assert runner.metadata.class_names == CLASSES
    assert not runner.is_active
    with pytest.raises(PromptsegError, match="not active"):
        runner.metadata  # noqa: B018


def test_onnxruntime_runs_on_the_cpu_provider(models):
    with open_runner(models["fp32"]) as runner:
        assert runner.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_follow_the_spec_at_native_size(models, backend):
    x = _image(2, 21, 34)
    with open_runner(models["fp32"], backend) as runner:
        assert runner.precision == "fp32" and runner.precision_note == ""
        assert [(t.name, t.dtype, t.shape) for t in runner.output_specs()] == [
            ("logits", "float32", ("batch", 3, "height", "width")), ("labels", "int64", ("batch", "height", "width"))]
        out = runner.infer({"image": x})
        again = runner.infer({"image": _image(1, 17, 16)})  # another shape in the same session
    assert out["logits"].shape == (2, 3, 21, 34) and out["logits"].dtype == np.float32
    assert out["labels"].shape == (2, 21, 34) and out["labels"].dtype == np.int64
    np.testing.assert_array_equal(out["labels"], out["logits"].argmax(1))
    assert again["logits"].shape == (1, 3, 17, 16)
    with open_runner(models["fp32"]) as reference:  # every backend computes what ONNX Runtime does
        np.testing.assert_allclose(out["logits"], reference.infer({"image": x})["logits"], atol=1e-4)


def test_int8_model_stays_close_to_fp32(models):
    x = _image(2, 32, 32, seed=1)
    with open_runner(models["fp32"]) as a, open_runner(models["int8"]) as b:
        assert b.precision == "int8"
        out_a, out_b = a.infer({"image": x}), b.infer({"image": x})
    assert np.abs(out_a["logits"] - out_b["logits"]).max() < 0.2  # 8-bit input and weights, 27-term dot products
    assert (out_a["labels"] == out_b["labels"]).mean() > 0.95


def qdq_in_float(model: Path, x: np.ndarray) -> np.ndarray:
    """The logits of a Q/DQ graph computed op by op in float: the exact result of its int8 arithmetic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no int8 kernel fusion
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]).run(["logits"],
                                                                                             {"image": x})[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_kernels_compute_the_qdq_arithmetic(models, backend):
    """7-bit weights: every u8 x s8 pair sum fits int16, so an int8 kernel must give the float
    simulation of the Q/DQ graph to rounding on any CPU (VNNI or not)."""
    x = _image(2, 32, 32, seed=1)
    with open_runner(models["int8_7bit"], backend) as runner:
        assert runner.precision == "int8"
        out = runner.infer({"image": x})
        # OpenVINO runs the float layers around the Q/DQ ones in bf16 where the CPU has bf16 units, and says so
        bf16_tail = "the float layers bf16" in runner.precision_note
    tolerance = {"rtol": 2 ** -7, "atol": 2e-3} if bf16_tail else {"atol": 1e-4}
    np.testing.assert_allclose(out["logits"], qdq_in_float(models["int8_7bit"], x), **tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_graph_that_breaks_the_spec_is_refused_at_activation(models, tmp_path, backend):
    model = onnx.load(str(models["fp32"]))
    model.graph.output[1].name = "label"
    model.graph.node[-1].output[0] = "label"
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    runner = open_runner(tmp_path / "renamed.onnx", backend)
    with pytest.raises(PromptsegError, match=r"tensors \['image'\] -> \['label', 'logits'\] \| expected \['image'\] "
                                             r"-> \['logits', 'labels'\] for a segmenter model"):
        runner.activate()
    assert not runner.is_active


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_without_metadata_or_file_is_a_clear_error(models, tmp_path, backend):
    model = onnx.load(str(models["fp32"]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(PromptsegError, match="not a promptseg export"):
        open_runner(tmp_path / "plain.onnx", backend).activate()
    with pytest.raises(PromptsegError, match="missing.onnx: model file not found"):
        open_runner(tmp_path / "missing.onnx", backend)
    (tmp_path / "junk.onnx").write_text("not a model")
    cannot = {"onnxruntime": "ONNX Runtime cannot load it", "openvino": "OpenVINO cannot read it"}[backend]
    with pytest.raises(PromptsegError, match=f"junk.onnx: {cannot}"):
        open_runner(tmp_path / "junk.onnx", backend).activate()
    with pytest.raises(PromptsegError, match="backend: got 'tflite'"):
        open_runner(models["fp32"], "tflite")


def test_providers_are_resolved_or_refused_by_name():
    assert resolve_providers(("cpu",)) == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(PromptsegError, match="provider: got 'gpu' | expected one of tensorrt, cuda, cpu"):
        resolve_providers(("gpu",))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(PromptsegError, match="provider 'cuda': not in this onnxruntime build | available: cpu"):
            resolve_providers(("cuda",))


def test_backend_options_round_trip_through_json_for_the_bench_subprocess():
    options = BackendOptions(providers=("cuda", "cpu"), threads=2, precision="int8",
                             profile=ShapeProfile((1, 3, 16, 16), (2, 3, 64, 64), (4, 3, 512, 512)), max_batch=4)
    assert BackendOptions.from_json(json.loads(json.dumps(options.to_json()))) == options
    with pytest.raises(PromptsegError, match="threads: got 0"):
        BackendOptions(threads=0).validate()


# ----------------------------------------------------------------------------- host processing


def test_fit_sides_downscales_upscales_and_refuses_slivers():
    assert fit_sides(np.zeros((3000, 1500, 3), np.uint8), MIN_SIDE, 1024).shape == (1024, 512, 3)
    assert fit_sides(np.zeros((1, 1, 3), np.uint8), MIN_SIDE, 1024).shape == (16, 16, 3)
    assert fit_sides(np.zeros((8, 40, 3), np.uint8), MIN_SIDE, 1024).shape == (16, 80, 3)
    small = np.zeros((40, 50, 3), np.uint8)
    assert fit_sides(small, MIN_SIDE, MAX_SIDE) is small
    with pytest.raises(PromptsegError, match=r"image 3000x1 \(WxH\): aspect ratio above 64:1"):
        fit_sides(np.zeros((1, 3000, 3), np.uint8), MIN_SIDE, 1024)


def test_inputs_are_collected_and_named_uniquely(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "x.png", "y.PNG", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"")
    files = collect_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "x.jpg"), str(tmp_path / "gone.jpg")])
    assert [p.name for p in files] == ["x.jpg", "x.png", "y.PNG", "gone.jpg"]
    assert output_names(files) == ["x_jpg", "x_png", "y", "gone"]
    assert output_names([Path("d1/x.png"), Path("d2/x.png")]) == ["x_png", "x_png_2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptsegError, match="empty: no image files"):
        collect_inputs([str(tmp_path / "empty")])


def test_pillow_decompression_bomb_becomes_a_reason(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 px is over twice the limit
    with pytest.raises(DataError, match=r"big.png: refused as a decompression bomb \(Image size \(40000 pixels\)"):
        check_pixels(tmp_path / "big.png", max_pixels=10**9)


# ----------------------------------------------------------------------------- torch-free device run


_BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
                raise ImportError(f"{name} is blocked: the device runtime must not import it")

    sys.meta_path.insert(0, Block())
    import promptseg.runtime.backends.onnxrt, promptseg.runtime.backends.tensorrt, promptseg.runtime.bench
    import promptseg.runtime.backends.openvino
    import promptseg.runtime.compare, promptseg.runtime.cuda_memory, promptseg.runtime.sources, promptseg.runtime.video
    from promptseg.runtime.cli import infer
    from promptseg.runtime.infer import InferConfig, run_infer

    model, images, out = sys.argv[1:4]
    summary = run_infer(InferConfig(model=model, inputs=(images,), out=out + "/api", batch=2, overlay=True))
    try:
        infer.main([model, "--input", images, "--out", out + "/cli"], standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip"))
    print(json.dumps({"succeeded": summary["succeeded"], "heavy": heavy}))
""")


def test_runtime_imports_and_infers_with_torch_blocked(models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(24, 24), (24, 24), (17, 40)]):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    done = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(models["fp32"]), str(images), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"succeeded": 3, "heavy": []}
    for kind in ("api", "cli"):
        assert sorted(p.name for p in (tmp_path / kind / "masks").iterdir()) == ["0.png", "1.png", "2.png"]
    assert Image.open(tmp_path / "api" / "masks" / "2.png").size == (40, 17)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cam_models_run_but_infer_wants_a_segmenter(models, tmp_path, backend):
    with open_runner(models["cam"], backend) as runner:
        out = runner.infer({"image": _image(1, 16, 16)})
    assert out["cams"].shape == (1, 2, 16, 16) and out["scores"].shape == (1, 2)
    assert out["cams"].min() >= 0 and 0 < out["scores"].min() <= out["scores"].max() < 1


def test_peak_rss_of_a_child_is_its_own_not_its_big_parents():
    """ru_maxrss survives exec; the bench child must not report the parent's memory as its own."""
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(300_000_000 // 8)  # 300 MB resident in this (parent) process
    code = "from promptseg.runtime.bench import peak_rss_mb; print(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 200 and ballast.sum() > 0


def test_a_provider_that_fails_to_start_is_an_error_not_a_quiet_cpu_fallback(models, monkeypatch):
    import onnxruntime as ort

    from promptseg.runtime.backends import onnxrt

    real = ort.InferenceSession

    class FallingBack(real):
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    with pytest.raises(PromptsegError, match="could not start CUDAExecutionProvider .* fell back to "
                                             "CPUExecutionProvider"):
        onnxrt.session_from_onnx(models["fp32"], ("cuda",))
    session = onnxrt.session_from_onnx(models["fp32"], "auto")  # auto: whatever starts
    assert session.get_providers() == ["CPUExecutionProvider"]
