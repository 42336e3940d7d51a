"""End-to-end wall time of `promptseg demo` on this machine (goal: <= 10 min on 2 cores).

Runs the demo from nothing in a fresh folder, in a child process, and writes
``bench/results/demo_cpu.{json,md}``: wall time, peak memory of the child, the stage times the
demo's own report records (beside the previous record's, as "before"), the machine (CPU
capability, bf16 units, measured matmul peak), each stage's throughput and share of that peak, and
the headline numbers of that run. Run it alone: a second torch job on the same two cores slows
both about tenfold.

    python bench/demo_cpu.py --out /tmp/demo_bench --seed 0 [--from-scratch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
GOAL_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo_bench", help="run folder; emptied first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-scratch", action="store_true", help="train the tiny CLIP and backbone too")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    previous = RESULTS / "demo_cpu.json"
    before = json.loads(previous.read_text()) if previous.is_file() else None
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "promptseg", "demo", "--out", str(out), "--seed", str(args.seed),
                    *(["--from-scratch"] if args.from_scratch else [])], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kB
    report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    result = {
        "wall_s": round(wall, 1), "goal_s": GOAL_S, "meets_goal": wall <= GOAL_S,
        "peak_rss_mb": round(peak_mb), "seed": args.seed, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "from_scratch": args.from_scratch, "machine_facts": report.get("machine"),
        "stage_s": timings, "report_total_s": report.get("total_s"), "throughput": report.get("throughput"),
        "before": {k: before[k] for k in ("wall_s", "stage_s", "machine", "machine_facts") if k in before}
        if before else None,
        "seg_val_miou": report["seg_val_miou"], "seg_val_miou_gt_trained": report["seg_val_miou_gt_trained"],
        "cam_miou": {m: v["cam_miou"] for m, v in report["methods"].items()},
        "context_leak": {m: v["context_leak"] for m, v in report["methods"].items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    slowest = sorted(timings.items(), key=lambda kv: -(kv[1] or 0))
    lines = [f"# `promptseg demo` end to end, {result['cpu_count']} cores, seed {args.seed}", "",
             f"Wall time {wall / 60:.1f} min (goal {GOAL_S / 60:.0f} min: "
             f"{'met' if result['meets_goal'] else 'not met'}); peak memory {result['peak_rss_mb']} MB.", "",
             f"Machine: {result['machine_facts']}.", "",
             "| stage | seconds | share | before (s) | images/s | share of matmul peak |", "|---|---|---|---|---|---|"]
    old_stages = (result["before"] or {}).get("stage_s", {})
    flow = result["throughput"] or {}

    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    lines += [f"| {name} | {sec:.1f} | {100 * sec / wall:.0f}% | {cell(old_stages.get(name), '.1f')} | "
              f"{cell(flow.get(name, {}).get('images_per_s'), '.0f')} | "
              f"{cell(flow.get(name, {}).get('peak_share'), '.1%')} |"
              for name, sec in slowest if sec is not None]
    if result["before"]:
        lines += ["", f"Before: {result['before']['wall_s'] / 60:.1f} min wall."]
    methods = ", ".join(f"{m} {result['cam_miou'][m]:.1f} / {result['context_leak'][m]:.3f}"
                        for m in result["cam_miou"])
    lines += ["", f"Segmenter val mIoU {result['seg_val_miou']:.1f} "
              f"(ground truth {result['seg_val_miou_gt_trained']:.1f}); CAM mIoU / leak: {methods}."]
    (RESULTS / "demo_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
