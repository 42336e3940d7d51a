from __future__ import annotations

import json

from promptseg.io import sha256_file
from promptseg.pipeline import CAM_METHODS, DemoConfig, run_demo
from promptseg.train.checkpoint import load_checkpoint, save_checkpoint


def test_demo_chain_writes_a_report_and_keeps_finished_stages(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), train_images=48, val_images=16, clip_images=32, clip_steps=2,
                     baseline_epochs=1, method_epochs=1, seg_epochs=1, threads=1)
    report = run_demo(cfg, show_progress=False)
    assert set(report["methods"]) == set(CAM_METHODS)
    for row in report["methods"].values():
        assert 0.0 <= row["cam_miou"] <= 100.0 and 0.0 <= row["context_leak"] <= 1.0
    assert "prompt_changed_share" in report["methods"]["pole"]
    markdown = (tmp_path / "demo" / "report.md").read_text()
    for method in CAM_METHODS:
        assert f"| {method} | {report['methods'][method]['cam_miou']:.1f} |" in markdown
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["seg_val_miou"] == report["seg_val_miou"]

    again = run_demo(cfg, show_progress=False)  # every stage is current: nothing retrains
    assert again["methods"] == report["methods"]
    assert again["timings_s"]["clip"] < 2 and again["timings_s"]["semples"] < 2

    # a changed input (the SemPLeS network) reruns the stages that read it, and only those
    net_path = tmp_path / "demo" / "semples" / "cam_net.pt"
    state = load_checkpoint(net_path)
    state["net"]["classifier.weight"] = -state["net"]["classifier.weight"]
    save_checkpoint(net_path, state)
    stamp = tmp_path / "demo" / "pseudo_semples" / "stage.json"
    before = json.loads(stamp.read_text())["inputs"][str(net_path)]
    third = run_demo(cfg, show_progress=False)
    assert json.loads(stamp.read_text())["inputs"][str(net_path)] == sha256_file(net_path) != before
    assert third["methods"] == report["methods"]
