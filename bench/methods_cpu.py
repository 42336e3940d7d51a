"""Issue-3 acceptance table: every CAM method on the default synthetic world, mean of seeds, CPU.

Runs (or reuses, through the demo's stage cache) ``runs/demo_seed<N>`` for each seed and writes
``bench/results/methods_cpu.json`` and ``.md`` with per-seed numbers, their mean, and the
orderings the training issue asks for.

    python bench/methods_cpu.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from promptseg.pipeline import CAM_METHODS, PipelineConfig, reproduction_checks, run_pipeline

RESULTS = Path(__file__).with_name("results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", default="runs", help="folder that holds runs/demo_seed<N>")
    parser.add_argument("--run", action="append", default=[], metavar="SEED=DIR",
                        help="use DIR for SEED (e.g. 0=runs/demo to reuse the demo's run)")
    args = parser.parse_args()
    dirs = {int(k): v for k, v in (item.split("=", 1) for item in args.run)}

    per_seed = {seed: run_pipeline(PipelineConfig(out=dirs.get(seed, f"{args.runs}/demo_seed{seed}"), seed=seed))
                for seed in args.seeds}
    mean = {m: {k: float(np.mean([per_seed[s]["methods"][m][k] for s in args.seeds]))
                for k in ("cam_miou", "context_leak", "oracle_cam_miou", "pseudo_mask_miou")} for m in CAM_METHODS}
    seg = {k: float(np.mean([per_seed[s][k] for s in args.seeds]))
           for k in ("pseudo_mask_miou", "seg_val_miou", "seg_val_miou_gt_trained", "clip_zero_shot_map")}
    pole_changed = float(np.mean([per_seed[s]["methods"]["pole"]["prompt_changed_share"] for s in args.seeds]))
    checks = reproduction_checks({**mean, "pole": {**mean["pole"], "prompt_changed_share": pole_changed}},
                                 seg["seg_val_miou"], seg["seg_val_miou_gt_trained"])
    result = {"seeds": args.seeds, "machine": platform.processor() or platform.machine(), "mean": mean,
              "segmenter_mean": seg, "pole_prompt_changed_share": pole_changed, "checks": checks,
              "per_seed": per_seed}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "methods_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# CAM methods on the synthetic world (mean of seeds {args.seeds})", "",
             "| method | CAM mIoU | context leak | pseudo-mask mIoU | oracle CAM mIoU |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {m} | {r['cam_miou']:.1f} | {r['context_leak']:.3f} | {r['pseudo_mask_miou']:.1f} | "
              f"{r['oracle_cam_miou']:.1f} |" for m, r in mean.items()]
    crf = all(per_seed[s].get("pseudo_mask_crf") for s in args.seeds)
    backbones = sorted({str(per_seed[s].get("cam_backbone")) for s in args.seeds})
    lines += ["", "CAM mIoU and context leak: CAMs at 4 scales with flips (the references' protocol), background "
              "threshold chosen on val.",
              f"CAM network backbone: {', '.join(backbones)}.",
              f"Pseudo-masks {'with dense CRF (background level chosen on val)' if crf else 'without CRF'}.",
              f"POLE prompts that differ from the class name: {pole_changed:.1%}",
              f"SemPLeS pseudo-mask mIoU {seg['pseudo_mask_miou']:.1f}; segmenter val mIoU {seg['seg_val_miou']:.1f} "
              f"(on ground truth {seg['seg_val_miou_gt_trained']:.1f})", "",
              *[f"- {name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()], ""]
    (RESULTS / "methods_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
