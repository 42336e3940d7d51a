from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_PIPELINE
from PIL import Image

from promptseg.claims import describe
from promptseg.cli import main
from promptseg.errors import ConfigError
from promptseg.pipeline import (
    CAM_METHODS,
    PipelineConfig,
    _stage,
    base_cam_config,
    method_config,
    method_guidance,
    reproduction_checks,
    run_pipeline,
)
from promptseg.train.pseudo import crf_available


def test_pipeline_report_holds_every_stage(tiny_demo):
    report = json.loads((tiny_demo / "report.json").read_text())
    assert set(report["methods"]) == set(CAM_METHODS)
    for row in report["methods"].values():
        assert 0.0 <= row["cam_miou"] <= 100.0 and 0.0 <= row["context_leak"] <= 1.0
        assert 0.0 <= row["pseudo_mask_miou"] <= 100.0
    assert report["seg_val_miou"] == report["methods"]["semples"]["seg_val_miou"]
    seg_run = json.loads((tiny_demo / "seg_semples" / "report.json").read_text())
    assert seg_run["method"] == "semples" and seg_run["seed"] == 0
    assert seg_run["pseudo_mask_miou"] == report["pseudo_mask_miou"] == report["methods"]["semples"]["pseudo_mask_miou"]
    assert seg_run["seg_val_miou_gt_trained"] == report["seg_val_miou_gt_trained"]
    assert seg_run["cam_miou"] == report["methods"]["semples"]["cam_miou"]
    assert 0.0 <= seg_run["pseudo_mask_context_leak"] <= 1.0
    assert "prompt_changed_share" in report["methods"]["pole"]
    assert report["pseudo_mask_crf"] is crf_available()  # the default "auto"
    pseudo_run = json.loads((tiny_demo / "pseudo_semples" / "report.json").read_text())
    assert pseudo_run["crf"] is crf_available()
    assert pseudo_run["low"] == report["methods"]["semples"]["pseudo_mask_background"]
    assert report["cam_backbone"] == "pretrained on the clip split"  # the world's web images
    pretrain = json.loads((tiny_demo / "pretrain" / "config.json").read_text())
    baseline = json.loads((tiny_demo / "baseline" / "config.json").read_text())
    assert pretrain["split"] == "clip" and baseline["net"]["pretrained"] == str(tiny_demo / "pretrain" / "cam_net.pt")
    pretrain_report = json.loads((tiny_demo / "pretrain" / "report.json").read_text())
    assert "cam_miou" not in pretrain_report and 0.0 <= pretrain_report["val_cam_miou"] <= 100.0  # no masks on web
    assert (tiny_demo / "pretrain" / "cams.png").is_file()  # pictures from val, which has ground truth
    assert "CAM network backbone: pretrained on the clip split." in (tiny_demo / "report.md").read_text()
    assert report["export"]["segmenter.onnx"]["parity"] == "passed"
    assert set(report["calibration"]) == {"tensorrt", "cpu", "cam_tensorrt"}  # both networks ship in INT8
    assert {r["precision"] for r in report["bench"]} >= {"fp32"}
    markdown = (tiny_demo / "report.md").read_text()
    clip_run = json.loads((tiny_demo / "clip" / "report.json").read_text())
    assert report["clip_object_over_context"] == clip_run["clip_object_over_context"]
    assert "prefers the object alone to its context alone" in markdown
    for method in CAM_METHODS:
        row = report["methods"][method]
        assert f"| {method} | {row['cam_miou']:.1f} | {row['context_leak']:.3f} | {row['pseudo_mask_miou']:.1f} |" \
            in markdown
    checks = report["checks"]
    assert checks == json.loads(json.dumps(reproduction_checks(report["methods"], report["seg_val_miou"],
                                                               report["seg_val_miou_gt_trained"],
                                                               report["calibration"])))
    methods = report["methods"]
    assert set(checks["differences"]) == {"clims_minus_baseline", "clims_minus_baseline_leak", "pole_minus_clims",
                                          "pole_minus_clims_leak", "semples_minus_clims", "semples_minus_clims_leak"}
    assert checks["differences"]["clims_minus_baseline"]["mean"] == \
        pytest.approx(methods["clims"]["cam_miou"] - methods["baseline"]["cam_miou"])
    for name, row in checks["differences"].items():
        assert row["verdict"] == "one seed" and f"- {describe(name, row)}" in markdown
    assert "(one seed; claimed:" in markdown and "yes" not in markdown.split("## The papers' claims")[1]
    assert checks["segmenter_gap_to_ground_truth"] == pytest.approx(report["seg_val_miou_gt_trained"]
                                                                    - report["seg_val_miou"])
    assert {checks["int8_gate_cpu"], checks["int8_gate_tensorrt"]} <= {True, False}
    for picture in ("examples.png", "latency_vs_miou.png"):
        with Image.open(tiny_demo / picture) as img:
            assert img.width > 100 and img.height > 100


def test_rerun_keeps_every_finished_stage(tiny_demo):
    before = json.loads((tiny_demo / "report.json").read_text())
    again = run_pipeline(PipelineConfig(out=str(tiny_demo), **TINY_PIPELINE), show_progress=False)
    assert again["methods"] == before["methods"] and again["bench"] == before["bench"]
    assert again["timings_s"] == before["timings_s"]  # the stages' own times, from when they ran
    stamps = {p.parent.name: json.loads(p.read_text()) for p in tiny_demo.glob("*/stage.json")}
    assert {"clip", "semples", "export", "int8_cpu", "bench"} <= set(stamps)
    assert all(stamp["seconds"] == again["timings_s"][name] for name, stamp in stamps.items()
               if name in again["timings_s"])


def test_a_changed_input_reruns_the_stage(tmp_path):
    source = tmp_path / "input.bin"
    source.write_bytes(b"one")
    calls = []

    def run(resume):
        calls.append(resume)
        (tmp_path / "stage" / "report.json").write_text(json.dumps({"n": len(calls)}))
        return {"n": len(calls)}

    timings: dict = {}
    config = PipelineConfig()
    assert _stage("s", tmp_path / "stage", config, run, timings, (source,)) == {"n": 1}
    assert _stage("s", tmp_path / "stage", config, run, timings, (source,)) == {"n": 1}  # kept
    source.write_bytes(b"two")
    assert _stage("s", tmp_path / "stage", config, run, timings, (source,)) == {"n": 2}  # input changed
    (tmp_path / "stage" / "report.json").unlink()  # interrupted: same stamp, no report -> resume
    assert _stage("s", tmp_path / "stage", config, run, timings, (source,)) == {"n": 3}
    assert calls == [False, False, True]
    assert "seconds" in json.loads((tmp_path / "stage" / "stage.json").read_text())


def test_pipeline_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="ship_method"):
        PipelineConfig(out=str(tmp_path), seg_methods=("clims",)).validate()
    with pytest.raises(ConfigError, match="'baseline' first"):
        PipelineConfig(methods=("clims",)).validate()
    with pytest.raises(ConfigError, match="crf"):
        PipelineConfig(crf="yes").validate()
    with pytest.raises(ConfigError, match="semples_generator"):  # SemPLeS refines a run made before it
        PipelineConfig(methods=("baseline", "semples"), semples_generator="clims").validate()
    PipelineConfig(methods=("baseline", "semples")).validate()  # S: the baseline, which never saw CLIP
    with pytest.raises(ConfigError, match="expected 'baseline' first, then some of clims, pole, semples, "
                                          "semples_no_suppression"):
        PipelineConfig(methods=("baseline", "semples_ablated")).validate()
    with pytest.raises(ConfigError, match="head: got '5x5'"):
        PipelineConfig(semples_head="5x5").validate()
    config = tmp_path / "p.json"
    config.write_text(json.dumps({"out": str(tmp_path / "run"), "epochs_typo": 3}))
    result = CliRunner().invoke(main, ["pipeline", str(config)])
    assert result.exit_code == 1 and "unknown keys ['epochs_typo']" in result.output


PROCEDURE = ("classifier_lr_mult", "weight_decay", "schedule", "augment")


def test_the_demos_semples_keeps_the_procedure_its_numbers_were_measured_with(tmp_path):
    """The demo's choices (PipelineConfig), not the reference's: classifier 10x, wd 1e-4, poly per step,
    CLIMS's crops; stage (b) a per-step cosine at a fixed 0.025 on the CAM stages' batch."""
    cfg = PipelineConfig(out=str(tmp_path))
    base = base_cam_config(cfg, tmp_path / "data")
    semples = method_config(cfg, base, "semples", "clip")
    assert [semples.procedure(k) for k in PROCEDURE] == [10.0, 1e-4, "poly", "scale_crop"]
    assert (semples.lr, semples.epochs, semples.net.head) == (3.2e-5, 5, "3x3")
    guide = semples.guidance
    assert (guide.prompt_schedule, guide.prompt_augment, guide.prompt_lr, guide.prompt_epochs) == \
        ("cosine_step", "scale_crop", 0.025, 4) and guide.prompt_batch_size is None
    assert guide.init_from == str(tmp_path / "baseline")
    clims = method_config(cfg, base, "clims", "clip")  # the CLIMS code's procedure, the demo's lr
    assert [clims.procedure(k) for k in PROCEDURE] == [10.0, 1e-4, "poly", "scale_crop"] and clims.lr == 1e-4
    reference = PipelineConfig(out=str(tmp_path), semples_classifier_lr_mult=None, semples_weight_decay=None,
                               semples_schedule=None, semples_prompt_schedule=None, semples_augment=None)
    semples = method_config(reference, base, "semples_no_suppression", "clip")
    assert [semples.procedure(k) for k in PROCEDURE] == [1.0, 0.03, "cosine_epoch", "randaugment"]
    assert (semples.guidance.prompt_schedule, semples.guidance.prompt_augment, semples.guidance.w_refine) == \
        ("cosine_epoch", "resized_crop", 0.0)
    with pytest.raises(ConfigError, match=r"semples_augment: got 'flip' \| expected null or one of scale_crop"):
        PipelineConfig(semples_augment="flip").validate()


def test_a_given_tiny_clip_keeps_the_tiny_clip_wording():
    given = method_guidance(PipelineConfig(clip_pretrained="runs/clip"), "clims", "runs/clip", "runs/demo/baseline")
    assert given.clip_pretrained == "runs/clip" and given.init_from == "runs/demo/baseline"
    assert given.class_template == "a photo of a {}." and given.cbs_threshold is None  # the tiny CLIP's
    real = method_guidance(PipelineConfig(clip_model="ViT-B-32", clip_pretrained="openai"), "clims", "openai", "b")
    assert real.class_template == "a photo of {}." and real.cbs_threshold == 0.26  # METHODS.md's


def test_reproduction_checks_give_one_seeds_numbers_not_verdicts():
    methods = {"baseline": {"cam_miou": 40.0, "context_leak": 0.5},
               "clims": {"cam_miou": 43.0, "context_leak": 0.4},
               "pole": {"cam_miou": 42.9, "context_leak": 0.3, "prompt_changed_share": 0.2},
               "semples": {"cam_miou": 43.5, "context_leak": 0.45, "mask_change_share": 0.03}}
    gates = {"cpu": {"gate_passed": True}, "tensorrt": {"gate_passed": False}}
    checks = reproduction_checks(methods, 60.0, 70.0, gates)
    differences = checks.pop("differences")
    assert checks == {"pole_prompt_changed_share": 0.2, "semples_mask_change_share": 0.03,
                      "segmenter_gap_to_ground_truth": 10.0, "int8_gate_cpu": True, "int8_gate_tensorrt": False}
    assert {k: round(v["mean"], 6) for k, v in differences.items()} == {
        "clims_minus_baseline": 3.0, "clims_minus_baseline_leak": -0.1, "pole_minus_clims": -0.1,
        "pole_minus_clims_leak": -0.1, "semples_minus_clims": 0.5, "semples_minus_clims_leak": 0.05}
    assert {v["verdict"] for v in differences.values()} == {"one seed"}
    # a run of some methods gets only the differences its methods allow
    assert reproduction_checks({m: methods[m] for m in ("baseline", "semples")}, None, None) == {
        "differences": {}, "semples_mask_change_share": 0.03}
    no_contexts = {m: {**row, "context_leak": None} for m, row in methods.items()}  # real data: no ContextMasks
    assert not any(k.endswith("_leak") for k in reproduction_checks(no_contexts, None, None)["differences"])


def test_semples_refines_a_generator_that_never_saw_clip(tiny_demo):
    """The reference's S (WeakTr) starts stage (a) from a checkpoint trained without CLIP; its head trains."""
    config = json.loads((tiny_demo / "semples" / "config.json").read_text())
    start = json.loads((Path(config["guidance"]["init_from"]) / "config.json").read_text())
    assert start["method"] == "baseline" and start["guidance"] is None
    assert config["net"]["head"] == "3x3" and config["guidance"]["train_backbone"] is False
    report = json.loads((tiny_demo / "report.json").read_text())
    pseudo = json.loads((tiny_demo / "pseudo_semples" / "report.json").read_text())
    assert pseudo["compared_to"] == str(tiny_demo / "pseudo_baseline")
    assert report["methods"]["semples"]["mask_change_share"] == pseudo["mask_change_share"]
    assert 0.0 <= pseudo["mask_change_share"] <= 1.0
