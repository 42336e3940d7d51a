"""The suite's own mutation check: plausible bugs, one per stage of the chain, each planted in a copy
of the package; the tests that guard that behaviour must then fail.

A plant is a textual edit of one source file. Its text must occur exactly once in today's source,
so the list follows the code: a refactor that moves the planted line fails here until the plant is
moved too. Each plant runs its guard tests in a fresh ``pytest`` whose working directory holds the
planted copy (so ``import promptseg`` finds it first); a plant is caught when that run ends with
failed tests (exit code 1), not with a collection or usage error; tests/conftest.py makes sure that
run imported the planted copy. The guards pass unplanted: they are part of the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plant:
    name: str
    file: str  # under promptseg/
    edits: tuple[tuple[str, str], ...]  # (old, new), each old text exactly once in the file
    tests: tuple[str, ...]  # node ids under tests/ that must fail


PLANTS = (
    Plant("data: 16-bit grey scaled by 256, not 257", "data/images.py",
          (("np.rint(values / 257.0)", "np.rint(values / 256.0)"),),
          ("test_images_loading.py::test_16_bit_full_range_reaches_255",)),
    Plant("eval: ignored pixels counted", "eval.py",
          (("valid = target != IGNORE_INDEX", "valid = target >= 0"),),
          ("test_eval.py::test_ignore_pixels_never_count",)),
    Plant("CLIMS: object and background views swapped in L_OTM / L_BTM", "train/methods.py",
          (("losses.object_text_matching(fg_f, text)", "losses.object_text_matching(bg_f, text)"),
           ("losses.background_text_matching(bg_f, text)", "losses.background_text_matching(fg_f, text)")),
          ("test_method_behaviour.py::test_clims_matching_raises_the_cam_on_the_object_and_lowers_it_on_the_context",)),
    Plant("POLE: the least correlated synonym chosen", "train/methods.py",
          (("candidates[cls][int(probs.argmax())]", "candidates[cls][int(probs.argmin())]"),),
          ("test_method_behaviour.py::test_pole_picks_the_candidate_closest_to_the_cam_masked_image",)),
    Plant("SemPLeS: the suppression term pulls the object towards its background", "train/losses.py",
          (("return -torch.log(1.0 - similarity(fg, prompts)).mean()",
            "return -torch.log(similarity(fg, prompts)).mean()"),),
          ("test_method_behaviour.py::test_semples_refinement_moves_the_mask_off_the_learned_background",)),
    Plant("CAMs: pixels below the threshold become foreground", "runtime/processing.py",
          (("np.where(peak > threshold, ids, np.uint8(0))", "np.where(peak < threshold, ids, np.uint8(0))"),),
          ("test_cam.py::test_score_cams_on_perfect_and_leaky_maps",)),
    Plant("export: the graph normalises without the mean", "export/wrappers.py",
          (("return (image - self.mean) * self.inv_std", "return image * self.inv_std"),),
          ("test_export.py::test_export_wrappers_compute_what_training_computes",)),
    Plant("runtime: 0..255 fed where the graph wants 0..1", "runtime/processing.py",
          ((" * np.float32(1 / 255)", ""),),
          ("test_runtime_host.py::test_the_graph_gets_chw_rgb_in_0_to_1",)),
    Plant("infer: a batch's masks written in reverse order", "runtime/infer.py",
          (("pool.submit(outputs.finish, frame, logits[k])", "pool.submit(outputs.finish, frame, logits[-1 - k])"),),
          ("test_runtime_cli.py::test_infer_writes_each_file_its_own_mask_in_mixed_batches",)),
    Plant("infer: labels brought to the frame's size by nearest neighbour", "runtime/processing.py",
          (("    rows = np.flatnonzero(mixed_cells.any(1))\n", "    rows = np.flatnonzero(mixed_cells.any(1))[:0]\n"),),
          ("test_runtime_host.py::test_upsampling_interpolates_between_regions_not_blocks",)),
    Plant("video: Cb and Cr swapped in the overlay tint", "runtime/processing.py",
          (("                      colours[:, k]))", "                      colours[:, 3 - k]))"),),
          ("test_runtime_host.py::test_yuv_tint_is_the_rgb_overlay_seen_through_the_video_colour_matrix",)),
    Plant("TensorRT: the engine cache key ignores the ONNX's content", "runtime/backends/tensorrt.py",
          (("onnx_sha256=sha256_file(onnx_path)", "onnx_sha256=str(onnx_path)"),),
          ("test_runtime_tensorrt.py::test_fake_tensorrt_rebuilds_when_the_onnx_at_the_same_path_changes",)),
    Plant("infer: frames resized with antialiasing, not sampled as the graph samples them", "runtime/processing.py",
          (("    if (height, width) == tuple(size_hw):\n        return pixels\n",
            "    if (height, width) != tuple(size_hw):\n"
            "        return np.asarray(Image.fromarray(pixels).resize((size_hw[1], size_hw[0]), Image.BILINEAR))\n"),),
          ("test_runtime_host.py::test_frames_are_sampled_to_the_networks_size_as_the_graph_samples_them",)),
    Plant("INT8 gate: any drop passes", "calibration/gate.py",
          (("within = self.drop(score) <= self.max_drop", "within = True"),),
          ("test_calibration.py::test_gate_negative_controls_fail_at_the_default_gate",)),
    Plant("INT8 repair: equalisation scales inverted", "calibration/equalise.py",
          (("scales[valid] = (ratio[valid] / centre) ** root", "scales[valid] = (centre / ratio[valid]) ** root"),),
          ("test_int8_repair.py::test_outlier_channel_fails_plain_int8_and_equalisation_repairs_it",)),
    Plant("OpenVINO: bf16 claimed on a CPU without bf16 units", "runtime/backends/openvino.py",
          (('has_bf16 = "BF16" in capabilities', 'has_bf16 = True'),),
          ("test_runtime_openvino.py::test_bf16_on_a_cpu_without_bf16_units_runs_fp32_and_says_so",)),
    Plant("claims: a difference on the wrong side called a hold", "claims.py",
          (('return "holds" if (low > 0) == (sign > 0) else "reversed"',
            'return "holds" if (low > 0) != (sign > 0) else "reversed"'),),
          ("test_claims.py",)),
)


def _plant(plant: Plant, where: Path) -> None:
    """A copy of the package under ``where`` with ``plant``'s edits (the prebuilt assets linked, not copied)."""
    shutil.copytree(ROOT / "promptseg", where / "promptseg", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (where / "promptseg" / "assets").symlink_to(ROOT / "promptseg" / "assets")
    target = where / "promptseg" / plant.file
    text = target.read_text()
    for old, new in plant.edits:
        assert text.count(old) == 1, f"{plant.name}: {old!r} is not exactly once in promptseg/{plant.file}"
        text = text.replace(old, new)
    target.write_text(text)


def _run_guards(plant: Plant, where: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PROMPTSEG_PLANTED_COPY"] = str(where)  # conftest.py checks that the copy is what gets imported
    tests = [str(ROOT / "tests" / t) for t in plant.tests]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                           *tests], cwd=where, env=env, capture_output=True, text=True, timeout=900)


def test_the_plants_apply_to_todays_source(tmp_path):
    for k, plant in enumerate(PLANTS):
        _plant(plant, tmp_path / str(k))


def test_every_planted_bug_fails_the_tests_that_guard_it(tmp_path):
    """Two plants at a time (most guard runs are one Python thread): every run must end in failed tests."""
    def check(item: tuple[int, Plant]) -> str | None:
        k, plant = item
        where = tmp_path / str(k)
        _plant(plant, where)
        done = _run_guards(plant, where)
        if done.returncode == 1 and " failed" in done.stdout:
            return None
        return f"{plant.name}: exit code {done.returncode}\n{done.stdout[-1500:]}{done.stderr[-800:]}"

    with ThreadPoolExecutor(2) as pool:
        survivors = [s for s in pool.map(check, enumerate(PLANTS)) if s]
    assert not survivors, "planted bugs the suite did not catch:\n" + "\n".join(survivors)


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.name)
def test_each_plant_names_guards_that_exist(plant):
    for test in plant.tests:
        path = ROOT / "tests" / test.split("::")[0]
        assert path.is_file(), test
        if "::" in test:
            assert f"def {test.split('::')[1]}(" in path.read_text(), test
