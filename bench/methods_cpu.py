"""The papers' claims as statistics over seeds, on the default synthetic world, CPU.

Runs (or reuses, through the pipeline's stage cache) ``runs/demo_seed<N>`` for each seed with every
CAM method plus SemPLeS's own ablation (same generator, suppression weight 0), and writes
``bench/results/methods_cpu.{json,md}``: per method the mean and 95% t-interval over seeds of CAM
mIoU, context leak, pseudo-mask mIoU and (for the shipped method) the segmenter's val mIoU; the
paired differences the papers claim with their intervals and verdicts (promptseg.claims); and the
README's claims table. Seeds 0-4 are for reporting only: tune on others.

A seed takes 40 (AVX-512, bf16) to 75 minutes (AVX2, fp32) on 2 cores, and runs/ does not outlive
a session here, so a seed whose run is gone can be taken from the record it left in methods_cpu.json
(``--recorded``): the claims are paired by seed, so each seed's methods must come from one run on
one machine, and the record names each seed's machine and precision.

    python bench/methods_cpu.py --seeds 0 1 2 3 4
    python bench/methods_cpu.py --seeds 0 1 2 3 4 --recorded 0 1 2 3   # 0-3 from the last record
    python bench/methods_cpu.py --render   # markdown and README table again from the JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

from promptseg.claims import README_END, README_START, claims_over_seeds, claims_table, describe, method_intervals
from promptseg.pipeline import CAM_METHODS, PipelineConfig, run_pipeline

RESULTS = Path(__file__).with_name("results")
README = Path(__file__).parent.parent / "README.md"
METHODS = (*CAM_METHODS, "semples_no_suppression")
METRICS = ("cam_miou", "context_leak", "pseudo_mask_miou", "seg_val_miou")


def precision(record: dict) -> str:
    """How a seed's run computed: the pipeline turns bf16 autocast on where the CPU has bf16 units."""
    machine = record.get("machine", {})
    units = machine.get("cpu_bf16_units")
    return f"{machine.get('cpu_capability', '?')}, " + ("bf16 autocast" if units else "fp32" if units is False else "?")


def chain_of(per_seed: dict, what: str) -> str:
    """``what`` plus the seeds each precision covered (e.g. seeds 0, 1 AVX512 bf16; 2-4 AVX2 fp32)."""
    groups: dict[str, list[str]] = {}
    for seed, record in per_seed.items():
        groups.setdefault(precision(record), []).append(str(seed))
    return f"{what}; " + "; ".join(f"seeds {', '.join(seeds)}: {kind}" for kind, seeds in groups.items())


def summarise(seeds: list[int], per_seed: dict, chain: str) -> dict:
    methods = {s: per_seed[s]["methods"] for s in seeds}
    return {"seeds": seeds, "chain": chain_of(per_seed, chain), "machine": platform.processor() or platform.machine(),
            "differences": claims_over_seeds(methods),
            "methods": {metric: method_intervals(methods, metric) for metric in METRICS},
            "segmenter_on_ground_truth": method_intervals(
                {s: {"gt": {"miou": per_seed[s]["seg_val_miou_gt_trained"]}} for s in seeds}, "miou").get("gt"),
            "per_seed": {str(seed): record for seed, record in per_seed.items()}}  # as JSON keys them


def render(result: dict) -> None:
    lines = [f"# The papers' claims on the synthetic world (seeds {result['seeds']})", "",
             f"Chain: {result.get('chain', 'not recorded')}.", "",
             "| method | CAM mIoU | context leak | pseudo-mask mIoU | segmenter val mIoU |",
             "| --- | --- | --- | --- | --- |"]

    def cell(metric, method, fmt):
        row = result["methods"][metric].get(method)
        if row is None:
            return "—"
        if row["ci95_low"] is None:
            return format(row["mean"], fmt)
        return f"{row['mean']:{fmt}} [{row['ci95_low']:{fmt}}, {row['ci95_high']:{fmt}}]"

    for method in result["methods"]["cam_miou"]:
        lines.append(f"| {method} | {cell('cam_miou', method, '.1f')} | {cell('context_leak', method, '.3f')} | "
                     f"{cell('pseudo_mask_miou', method, '.1f')} | {cell('seg_val_miou', method, '.1f')} |")
    lines += ["", "Mean [95% t-interval] over seeds. CAMs at 4 scales with flips, background threshold chosen on val.",
              "", "## Claims (paired by seed)", "", *[f"- {describe(n, r)}" for n, r in result["differences"].items()],
              "", "## Per seed (CAM mIoU; each seed's methods from one run on one machine)", ""]
    methods = list(result["methods"]["cam_miou"])
    lines += [f"| seed | machine | {' | '.join(methods)} | segmenter | on ground truth |",
              "| --- | --- |" + " ---: |" * (len(methods) + 2)]
    for seed in result["seeds"]:
        record = result["per_seed"][str(seed)]
        cams = " | ".join(f"{record['methods'][m]['cam_miou']:.1f}" for m in methods)
        lines.append(f"| {seed} | {precision(record)} | {cams} | {record['seg_val_miou']:.1f} | "
                     f"{record['seg_val_miou_gt_trained']:.1f} |")
    lines.append("")
    (RESULTS / "methods_cpu.md").write_text("\n".join(lines))
    readme = README.read_text()
    block = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if block.search(readme):
        README.write_text(block.sub(lambda _: claims_table(result), readme))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs", default="runs", help="folder that holds runs/demo_seed<N>")
    parser.add_argument("--run", action="append", default=[], metavar="SEED=DIR",
                        help="use DIR for SEED (e.g. 0=runs/demo to reuse the demo's run)")
    parser.add_argument("--recorded", type=int, nargs="+", default=[], metavar="SEED",
                        help="take these seeds from bench/results/methods_cpu.json's per-seed records (their runs are gone)")
    parser.add_argument("--render", action="store_true", help="only render the markdown and README from the JSON")
    parser.add_argument("--chain", default="the current defaults (faithful reference budgets, prebuilt CLIP and backbone)",
                        help="what the runs were, for the record")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.render:
        render(json.loads((RESULTS / "methods_cpu.json").read_text()))
        return
    dirs = {int(k): v for k, v in (item.split("=", 1) for item in args.run)}
    recorded = json.loads((RESULTS / "methods_cpu.json").read_text())["per_seed"] if args.recorded else {}
    missing = [seed for seed in args.recorded if str(seed) not in recorded]
    if missing:
        parser.error(f"bench/results/methods_cpu.json has no record of seed(s) {missing}")
    per_seed = {seed: recorded[str(seed)] if seed in args.recorded else
                run_pipeline(PipelineConfig(out=dirs.get(seed, f"{args.runs}/demo_seed{seed}"), seed=seed,
                                            methods=METHODS))
                for seed in args.seeds}
    result = summarise(args.seeds, per_seed, args.chain)
    (RESULTS / "methods_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result)


if __name__ == "__main__":
    main()
