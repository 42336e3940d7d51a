"""The device commands end to end through ``promptseg.cli``: a bad-input set for ``infer``, ``bench``
rows and plot, ``compare`` on a small world, and clean errors where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_runtime_models import CLASSES, tiny_cam, tiny_segmenter

from promptseg.cli import main
from promptseg.data.synth import SynthConfig, write_world
from promptseg.data.voc import VOCDataset

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    return {"fp32": tiny_segmenter(root / "seg.onnx"), "int8": tiny_segmenter(root / "seg_int8.onnx", "int8"),
            "cam": tiny_cam(root / "cam.onnx")}


def _run(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command", ["infer", "bench", "compare", "build-engine"])
def test_device_commands_are_registered_with_help(command):
    result = _run([command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert re.search(rf"^\s+{command}\s", _run(["--help"]).output, re.M)


# ----------------------------------------------------------------------------- infer: the bad-input set


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` but holds almost no data (a bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _bad_input_set(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Files that must work (name -> (W, H) of their mask) and files that must fail (name -> reason regex)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "good.jpg", quality=90)
    Image.fromarray(rgb[:30]).save(root / "good_wide.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (36, 36))).astype(np.uint16)).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(root / "palette.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 48), dtype=np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.fromarray(rng.integers(0, 256, (40, 400, 3), dtype=np.uint8)).save(root / "large.png")
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("this is not an image\n")
    _png_header_only(root / "bomb.png", 100_000, 100_000)  # Pillow itself refuses this header
    Image.new("RGB", (200, 200)).save(root / "too_many_pixels.png")  # over --max-pixels below
    Image.new("RGB", (3000, 1)).save(root / "sliver.png")  # any aspect: every frame runs at the network's size
    good = {"good.jpg": (48, 40), "good_wide.png": (48, 30), "cmyk.jpg": (48, 40), "grey16.png": (36, 36),
            "palette.png": (48, 40), "rgba.png": (48, 40), "one_pixel.png": (1, 1), "large.png": (400, 40),
            "sliver.png": (3000, 1)}
    bad = {"truncated.jpg": r"truncated\.jpg: unreadable image \(image file is truncated",
           "text.png": r"text\.png: not an image Pillow can read",
           "bomb.png": r"bomb\.png: refused as a decompression bomb \(Image size \(10000000000 pixels\)",
           "too_many_pixels.png": r"too_many_pixels\.png: 200x200 \(WxH\) is 40000 pixels \| expected at most 30000"}
    return good, bad


def test_infer_reports_each_bad_file_and_writes_the_good_ones(models, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    good, bad = _bad_input_set(images)
    result = _run(["infer", models["fp32"], "--input", images, "--out", out, "--batch", "3", "--overlay",
                   "--max-pixels", "30000"])
    assert result.exit_code == 1, result.output
    assert f"Error: {len(bad)} of {len(good) + len(bad)} inputs failed" in result.output
    for name, reason in bad.items():
        assert re.search(r"failed: .*" + reason, result.output), name
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (len(good), len(bad))
    by_name = {Path(r["file"]).name: r for r in summary["files"]}
    for name, reason in bad.items():
        assert not by_name[name]["ok"] and re.search(reason, by_name[name]["reason"])
    for name, size in good.items():
        stem = Path(name).stem
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size, name
        assert mask.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # the model's palette, from metadata
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
        overlay = Image.open(out / "overlays" / f"{stem}.jpg")
        assert overlay.format == "JPEG" and overlay.size == size
        assert by_name[name]["ok"] and set(by_name[name]["classes"]) <= set(CLASSES)
        assert by_name[name]["model_size_wh"] == [32, 32]  # the network's input size; the mask at full size


def test_infer_accepts_globbed_files_and_succeeds_with_exit_0(models, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20 + i, 20), (60 * i, 0, 0)).save(files[-1])
    result = _run(["infer", models["int8"], "--input", files[0], *files[1:], "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "3 of 3 images" in result.output and "int8" in result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["precision"] == "int8"


def test_infer_writes_each_file_its_own_mask_in_mixed_batches(models, tmp_path):
    """Every written mask equals the runner on that file alone, whatever batch it shared."""
    from promptseg.data.images import load_rgb
    from promptseg.runtime.backends import open_runner
    from promptseg.runtime.processing import stack_batch, to_model_size, upsample_labels

    rng = np.random.default_rng(7)
    files = []
    for i, (width, height) in enumerate([(48, 40)] * 4 + [(97, 61)] * 3 + [(48, 40)]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(files[-1])
    out = tmp_path / "out"
    result = _run(["infer", models["fp32"], "--input", *files, "--out", out, "--batch", "4"])
    assert result.exit_code == 0, result.output
    written = {}
    with open_runner(str(models["fp32"]), "onnxruntime") as runner:
        for path in files:
            original = load_rgb(path)
            feed = stack_batch([to_model_size(Image.fromarray(original), runner.metadata.input_size)])
            alone = upsample_labels(runner.infer({"image": feed})["logits"][0], original.shape[:2])
            written[path.stem] = np.asarray(Image.open(out / "masks" / f"{path.stem}.png"))
            np.testing.assert_array_equal(written[path.stem], alone, err_msg=path.name)
    same_size = [written[f"img{i}"] for i in (0, 1, 2, 3, 7)]  # a swap among these would show
    assert all(not np.array_equal(a, b) for i, a in enumerate(same_size) for b in same_size[i + 1:])


def test_infer_refuses_a_cam_model(models, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    result = _run(["infer", models["cam"], "--input", tmp_path / "a.png", "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "a cam model | expected a segmenter" in result.output


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: this checks the message without it")
def test_infer_and_build_engine_name_a_missing_tensorrt(models, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    for args in (["infer", models["fp32"], "--input", tmp_path / "a.png", "--out", tmp_path / "o", "--backend",
                  "tensorrt"], ["build-engine", models["fp32"]]):
        result = _run(args)
        assert result.exit_code == 1 and "Error: tensorrt not installed" in result.output
        assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- bench


def test_bench_writes_rows_a_table_and_a_plot(models, tmp_path):
    out = tmp_path / "bench" / "rows.json"
    result = _run(["bench", models["fp32"], models["int8"], "--batch", "1", "--batch", "2", "--warmup", "1",
                   "--iters", "5", "--threads", "1", "--out", out])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(Path(r["model"]).name, r["precision"], r["batch"]) for r in rows] == [
        ("seg.onnx", "fp32", 1), ("seg.onnx", "fp32", 2), ("seg_int8.onnx", "int8", 1), ("seg_int8.onnx", "int8", 2)]
    for row in rows:
        assert row["backend"] == "onnxruntime" and row["input_shape"] == [row["batch"], 3, 32, 32]
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["throughput"] > 0 and row["pre_ms"] > 0 and row["post_ms"] > 0
        assert 0 < row["import_s"] < row["cold_start_s"] < 30 and 20 < row["peak_rss_mb"] < 2000
        assert row["providers"] == ["CPUExecutionProvider"]
    assert "| seg_int8.onnx | onnxruntime | int8 | 2 |" in result.output
    assert Image.open(out.with_suffix(".png")).size[1] > 100


def test_bench_failure_in_the_subprocess_is_a_clean_error(models, tmp_path):
    result = _run(["bench", models["fp32"], "--providers", "gpu", "--iters", "1", "--out", tmp_path / "r.json"])
    assert result.exit_code == 1
    assert "failed: Error: provider: got 'gpu'" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare_world")
    write_world(root, SynthConfig(seed=5, train=2, val=6, clip_images=0))
    return root


def test_compare_reports_differences_agreement_and_miou(world, tmp_path):
    names = ("background", *VOCDataset(world, "val").class_names)
    fp32 = tiny_segmenter(tmp_path / "a.onnx", class_names=names)
    int8 = tiny_segmenter(tmp_path / "b.onnx", "int8", class_names=names)
    result = _run(["compare", fp32, int8, "--data", world, "--limit", "4", "--out", tmp_path / "cmp.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert report["images"] == 4 and report["model_b"]["precision"] == "int8"
    assert 0 < report["logits"]["mean_abs_diff"] <= report["logits"]["max_abs_diff"] < 0.5
    assert 0.9 < report["label_agreement"] < 1
    assert set(report["model_a"]["per_class_iou"]) == set(names)
    same = _run(["compare", fp32, fp32, "--data", world, "--limit", "2"])
    assert same.exit_code == 0 and "max |diff| 0," in same.output and "label agreement 100.00%" in same.output


def test_compare_refuses_models_whose_classes_differ_from_the_data(world, models):
    result = _run(["compare", models["fp32"], models["int8"], "--data", world])
    assert result.exit_code == 1
    assert "classes ['boat', 'train', 'cow', 'plane', 'car', 'bird'] | expected the models' foreground classes " \
           "['cat', 'dog']" in result.output


# ----------------------------------------------------------------------------- build-engine


def test_build_engine_checks_its_shape_options(models):
    result = _run(["build-engine", models["fp32"], "--min-shape", "1x3x16x16"])
    assert result.exit_code == 2 and "give all of --min-shape, --opt-shape and --max-shape" in result.output
    result = _run(["build-engine", models["fp32"], "--min-shape", "1x3x16", "--opt-shape", "1x3x32x32",
                   "--max-shape", "1x3x64x64"])
    assert result.exit_code == 1 and "ranks differ" in result.output
    result = _run(["build-engine", models["fp32"], "--min-shape", "1x3x64x64", "--opt-shape", "1x3x32x32",
                   "--max-shape", "1x3x64x64"])
    assert result.exit_code == 1 and "expected min <= opt <= max" in result.output


def test_a_bench_row_reports_the_precision_that_ran_not_the_onnxs(models, monkeypatch, capsys):
    """A TensorRT engine built with --precision fp16 from an fp32 ONNX runs fp16: the row must say so."""
    from promptseg.runtime import bench
    from promptseg.runtime.backends import BackendOptions
    from promptseg.runtime.backends.onnxrt import OnnxrtRunner

    class Fp16Engine(OnnxrtRunner):  # the model's own graph, reporting the precision an engine was built at
        precision = property(lambda self: "fp16")

    monkeypatch.setattr(bench, "open_runner", lambda model, backend, options: Fp16Engine(model))
    monkeypatch.setattr(bench, "import_backend", lambda name: None)
    bench.child_main(0.0, {"model": str(models["fp32"]), "backend": "tensorrt", "batch": 1, "warmup": 0,
                           "iters": 2, "options": BackendOptions().to_json()})
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(bench.ROW_MARK)][-1]
    assert json.loads(line[len(bench.ROW_MARK):])["precision"] == "fp16"
