"""``promptseg calibrate``: a thin layer over :func:`promptseg.calibration.calibrate`."""

from __future__ import annotations

from pathlib import Path

import click

from .config import CPU_CANDIDATE_NAMES, CalibrationConfig, Method, Target


def _table(report: dict) -> str:
    head = f"{'candidate':<20} {'ms/img':>8} {'ms b=1':>8} {'mIoU':>7} {'drop':>6} {'agree':>7}  gate"
    lines = [head, "-" * len(head)]
    for row in report["candidates"]:
        if "error" in row:
            lines.append(f"{row['name']:<20} not run: {row['error'][:80]}")
            continue
        miou = "-" if row["miou"] is None else f"{row['miou']:.2f}"
        mark = "chosen" if row["chosen"] else ("pass" if row["passed"] else "FAIL")
        lines.append(f"{row['name']:<20} {row['latency_ms']:>8.3f} {row['latency_ms_batch1']:>8.3f} {miou:>7} "
                     f"{row['miou_drop']:>6.2f} {100 * row['label_agreement']:>6.2f}%  {mark}")
    return "\n".join(lines)


def _repair_table(repair: dict) -> str:
    """The TensorRT repair's steps: drop, CPU latency, what each did."""
    lines = [f"{'step':<14} {'drop':>6} {'ms/img':>8}  result"]
    for step in repair["steps"]:
        ms = f"{step['latency_ms']:.3f}" if "latency_ms" in step else "-"
        result = ("pass" if step["passed"] else "FAIL") + ("" if step["kept"] else " (not kept)")
        extra = step.get("layers") or [t["tensor"] + ": " + t["method"] for t in step.get("tensors", [])]
        lines.append(f"{step['step']:<14} {step['drop']:>6.2f} {ms:>8}  {result}"
                     + (f"  {', '.join(extra)}" if extra else ""))
    counts = [f"{r['images']}: {r['drop_plain']:.2f} -> {r['drop_repaired']:.2f}"
              for r in repair.get("calibration_images", []) if r["drop_plain"] is not None]
    if counts:
        lines.append("drop by calibration images (plain -> repaired): " + ", ".join(counts))
    return "\n".join(lines)


def _print(report: dict) -> None:
    click.echo(_table(report))
    if "repair" in report:
        click.echo(_repair_table(report["repair"]))


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"got {text!r} | expected comma-separated counts, e.g. 16,64,256",
                                 param_hint="--image-counts") from None


@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="VOC-layout dataset: calibration images from --split, the gate on --gate-split (with masks).")
@click.option("--split", default="train", show_default=True, help="Split of --data to calibrate on.")
@click.option("--gate-split", default="val", show_default=True,
              help="Split of --data the accuracy gate runs on (divided from --split when they are the same).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder of images to calibrate on instead of --split; without --data the gate uses the "
                   "folder's other images and scores INT8 against FP32 labels (no masks).")
@click.option("--num", default=256, show_default=True, help="Number of calibration images.")
@click.option("--gate-num", default=500, show_default=True, help="At most this many held-out gate images.")
@click.option("--method", type=click.Choice([m.value for m in Method]), default="minmax", show_default=True)
@click.option("--percentile", default=99.999, show_default=True, help="For --method percentile.")
@click.option("--target", type=click.Choice([t.value for t in Target]), default="tensorrt", show_default=True,
              help="tensorrt: symmetric int8 QDQ for TensorRT; cpu: the fastest model this CPU runs (ONNX "
                   "Runtime; OpenVINO too with the openvino extra).")
@click.option("--max-drop", default=1.0, show_default=True, help="mIoU points INT8 may lose against FP32.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: MODEL's folder/calibration-TARGET].")
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--batch", default=16, show_default=True, help="Images per inference batch.")
@click.option("--latency-batch", default=8, show_default=True, help="Batch the candidates are timed and chosen at.")
@click.option("--latency-runs", default=20, show_default=True, help="Timed runs per candidate (median).")
@click.option("--candidate", "candidates", multiple=True, type=click.Choice(CPU_CANDIDATE_NAMES),
              help="CPU target: try only these (repeatable; fp32 is always measured) [default: all].")
@click.option("--keep-float", "keep_float", multiple=True, metavar="LAYER",
              help="Keep this layer (ONNX node name, as in the report's sensitivity) out of INT8 (repeatable).")
@click.option("--repair/--no-repair", default=True, show_default=True,
              help="TensorRT: when plain INT8 fails the gate, equalise, re-range sensitive tensors, then keep "
                   "the fewest sensitive layers float until it passes.")
@click.option("--cam-threshold", type=float, default=None,
              help="CAM graph: the background threshold of its pseudo-masks [default: recorded in the model].")
@click.option("--image-counts", default="16,64,256", show_default=True,
              help="TensorRT: report the gate's drop with these many calibration images (comma list; '' none).")
def calibrate(model: Path, data_dir, split, gate_split, images_dir, num, gate_num, method, percentile, target,
              max_drop, out, threads, batch, latency_batch, latency_runs, candidates, keep_float, repair,
              cam_threshold, image_counts) -> None:
    """Quantise an exported segmenter or CAM graph to INT8 from real images and gate it on held-out images.

    Writes MODEL_STEM.TARGET.onnx, calibration_cache.json (per-tensor ranges), calibration_report.json
    and, for TensorRT, calibration_sensitivity.png (which layer breaks INT8) to --out. Exits non-zero
    when INT8 loses more than --max-drop mIoU points against FP32 (the report is still written).
    """
    from .run import CalibrationGateError, output_name
    from .run import calibrate as run_calibration

    out = out or model.parent / f"calibration-{target}"
    cfg = CalibrationConfig(model=str(model), out=str(out), data=data_dir, images=images_dir, split=split,
                            gate_split=gate_split, num=num, gate_num=gate_num, method=method, percentile=percentile,
                            target=target, max_drop=max_drop, threads=threads, batch=batch,
                            latency_batch=latency_batch, latency_runs=latency_runs, keep_float=keep_float,
                            repair=repair, cam_threshold=cam_threshold, image_counts=_counts(image_counts),
                            **({"cpu_candidates": tuple(candidates)} if candidates else {}))
    try:
        report = run_calibration(cfg, log=lambda message: click.echo(message, err=True))
    except CalibrationGateError as exc:
        _print(exc.report)
        raise
    _print(report)
    if report["note"]:
        click.echo(report["note"])
    miou = "" if report["miou_fp32"] is None else \
        f"mIoU FP32 {report['miou_fp32']:.2f} / INT8 {report['miou_int8']:.2f}, "
    click.echo(f"{miou}label agreement {100 * report['label_agreement']:.2f}% on {report['gate']['used']} held-out "
               f"images; wrote {out / output_name(model, cfg.target)}")
