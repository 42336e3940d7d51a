from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from promptseg.cli import main
from promptseg.data.voc import VOCDataset

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_stages_that_exist():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "train", "demo", "cams", "pseudo-masks"):
        assert re.search(rf"^\s+{command}\s", result.output, re.M), command
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert all(name in train_help for name in ("clip", "cam", "seg"))


def test_data_synth_writes_a_readable_world(tmp_path):
    out = tmp_path / "w"
    result = CliRunner().invoke(main, ["data", "synth", str(out), "--seed", "2", "--train", "8", "--val", "4",
                                       "--clip-images", "5"])
    assert result.exit_code == 0, result.output
    ds = VOCDataset(out, "val")
    assert len(ds) == 4 and ds[0].load_mask().shape == (64, 64)
    labels = np.load(out / "cls_labels.npy", allow_pickle=True).item()
    assert len(VOCDataset(out, "clip")) == 5  # the web images: labels, no masks
    assert len(labels) == 8 + 4 + 5 and all(v.dtype == np.float32 and v.shape == (6,) for v in labels.values())


def test_bad_input_is_a_clean_error_not_a_traceback(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    result = subprocess.run([sys.executable, "-m", "promptseg.cli", "train", "clip", "--data", str(tmp_path),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert "split 'val' not found" in result.stderr  # names the missing split file


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("## Tests", 1)[1]
    command = re.search(r"```(?:bash|sh)?\n(.*?)```", tests_section, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci


def test_cams_and_pseudo_masks_commands(baseline_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["cams", str(baseline_run), "--out", str(tmp_path / "cams"), "--scales", "1.0"])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "cams").glob("*.npy"))
    assert len(files) == 96
    cams = np.load(files[0])
    assert cams.shape == (6, 64, 64) and cams.dtype == np.float16 and float(cams.max()) <= 1.0
    result = runner.invoke(main, ["pseudo-masks", str(baseline_run), "--out", str(tmp_path / "pm"), "--scales", "1"])
    assert result.exit_code == 0 and "pseudo-mask mIoU" in result.output
    result = runner.invoke(main, ["cams", str(baseline_run), "--out", str(tmp_path / "x"), "--scales", "a,b"])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_the_cli_starts_without_loading_the_heavy_libraries():
    """Every command, infer on a device included, starts in a fraction of a second: torch, onnx and the
    quantizer load only in the commands that use them."""
    heavy = ("torch", "onnx", "onnxruntime.quantization", "openvino", "av")
    code = f"import sys, promptseg.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
