"""Issue-24 record: 1080p frames end to end on this CPU, before and after the fast host path.

Builds (or reuses, under ``--work``) the demo's segmenter (LR-ASPP MobileNetV3-Large at 64 px, trained
on the synthetic world's ground truth as the demo's ``seg_gt`` is: 2000 images, 10 epochs; its masks
must have real regions, or the agreement check below proves nothing), 1080p JPEG frames and a 1080p
H.264 video made from the world's val images, then measures in one run:

- before: ``promptseg infer`` of the code at ``--before`` (default: the commit before the fast host
  path), images, masks only and with overlays, as the issue measured it (frames / its "seconds");
- after: ``promptseg bench --input`` rows (fresh subprocess each: peak RSS is the run's own) for the
  image folder and the video, masks only and with overlays, batch 1 and larger batches;
- the same masks: label agreement of the new masks with the old ones, pixel by pixel, all frames;
- the graph alone at the network's input size and at the 1024 px side the old path fed it.

Writes ``bench/results/framerate_cpu.{json,md}``.

    python bench/framerate_cpu.py                 # about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from promptseg.io import read_json, write_json_atomic, write_text_atomic
from promptseg.runtime.backends import BackendOptions, open_runner
from promptseg.runtime.bench import host_info, measure
from promptseg.runtime.framerate import FramerateConfig, format_framerate_table, run_framerate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results")
FRAME_WH = (1920, 1080)
GOALS = {"masks_fps": 30.0, "overlay_fps": 20.0, "end_to_end_over_graph": 2.0, "peak_rss_mb": 250.0,
         "label_agreement": 0.999}


def build_model(work: Path, epochs: int) -> Path:
    """The demo's ground-truth segmenter, exported like the demo's; refused if it learned no foreground."""
    import torch

    from promptseg.data.synth import SynthConfig, write_world
    from promptseg.export.exporter import load_segmenter, model_metadata
    from promptseg.export.onnx_export import export_onnx
    from promptseg.export.wrappers import SegmenterForExport
    from promptseg.runtime.spec import SEGMENTER
    from promptseg.train.seg import SegTrainConfig, train_segmenter

    data, run, model = work / "data", work / "seg_gt", work / "segmenter.onnx"
    if model.is_file():
        return model
    if not (data / "classes.json").is_file():
        write_world(data, SynthConfig(seed=0, train=2000, val=120, clip_images=0))
    if not (run / "report.json").is_file():
        train_segmenter(SegTrainConfig(data=str(data), out=str(run), input_size=64, epochs=epochs, seed=0))
    miou = read_json(run / "report.json")["seg_val_miou"]
    if miou < 50:
        raise SystemExit(f"{run}: val mIoU {miou:.1f}: a segmenter that finds little foreground makes the "
                         f"agreement check trivial; train longer (--epochs)")
    segmenter, classes = load_segmenter(run)
    meta = model_metadata("segmenter", ("background", *classes), segmenter.input_size, "ground_truth")
    export_onnx(SegmenterForExport(segmenter), SEGMENTER, meta, torch.rand(2, 3, 64, 64), model)
    return model


def make_frames(work: Path, count: int, video_frames: int) -> tuple[Path, Path]:
    """1080p JPEGs (quality 90) and a 1080p H.264 video of the world's val images, upscaled."""
    import av

    from promptseg.data.voc import VOCDataset

    folder, video = work / "frames_1080p", work / "video_1080p.mp4"
    samples = list(VOCDataset(work / "data", "val"))
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = Image.fromarray(samples[i % len(samples)].load_image()).resize(FRAME_WH, Image.BICUBIC)
            image.save(folder / f"frame_{i:03d}.jpg", quality=90)
    if not video.is_file():
        container = av.open(str(video), mode="w")
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = *FRAME_WH, "yuv420p"
        for i in range(video_frames):
            image = Image.fromarray(samples[i % len(samples)].load_image()).resize(FRAME_WH, Image.BICUBIC)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        container.close()
    return folder, video


def infer_before(ref: str, model: Path, frames: Path, out: Path, overlay: bool) -> dict:
    """The old ``promptseg infer`` (its package extracted from git at ``ref``), timed as the issue timed it."""
    tree = out.parent / f"promptseg_{ref}"
    if not tree.is_dir():
        archive = subprocess.run(["git", "archive", ref, "promptseg"], cwd=ROOT, capture_output=True, check=True)
        tree.mkdir(parents=True)
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = ("import sys, promptseg; print('FROM', promptseg.__file__); from promptseg.runtime.cli import infer; "
            "infer.main(sys.argv[1:], standalone_mode=False); "
            "print('VMHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    args = [str(p.resolve()) for p in (model, frames, out)]
    args = [args[0], "--input", args[1], "--out", args[2]] + (["--overlay"] if overlay else [])
    # run in the extracted tree: `python -c` puts the working directory first on sys.path
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True,
                          cwd=tree)
    source = next(line for line in done.stdout.splitlines() if line.startswith("FROM")).split(maxsplit=1)[1]
    if not Path(source).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the old infer imported {source}, not the code of {ref}")
    summary = read_json(out / "summary.json")
    rss = int(next(line for line in done.stdout.splitlines() if line.startswith("VMHWM")).split()[1]) / 1024
    return {"ref": ref, "overlay": overlay, "frames": summary["succeeded"], "seconds": summary["seconds"],
            "frames_per_s": summary["succeeded"] / summary["seconds"], "peak_rss_mb": rss}


def label_agreement(new_masks: Path, old_masks: Path) -> dict:
    same = total = 0
    for path in sorted(old_masks.glob("*.png")):
        old, new = np.asarray(Image.open(path)), np.asarray(Image.open(new_masks / path.name))
        same += int((old == new).sum())
        total += old.size
    return {"frames": len(list(old_masks.glob("*.png"))), "label_agreement": same / total}


def graph_only(model: Path, size_hw: tuple[int, int] | None, iters: int) -> float:
    """p50 ms of the graph alone at batch 1 on a ``size_hw`` input (None: the network's input size)."""
    with open_runner(str(model)) as runner:
        return measure(runner, 1, warmup=5, iters=iters, size_hw=size_hw)["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/framerate", help="folder for the model, frames and outputs")
    parser.add_argument("--before", default="682fbeb", help="git ref of the old infer to compare with")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--video-frames", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work, args.epochs)
    frames, video = make_frames(work, args.frames, args.video_frames)
    load_before = os.getloadavg()

    before = [infer_before(args.before, model, frames, work / f"before_{'overlay' if o else 'masks'}", o)
              for o in (False, True)]
    rows = []
    for overlay in (False, True):
        for source in (frames, video):
            cfg = FramerateConfig(model=str(model), inputs=(str(source),), batches=tuple(args.batches),
                                  overlay=overlay, options=BackendOptions())
            rows += run_framerate(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the same masks: one more masks-only run, kept for comparison
        from promptseg.runtime.infer import InferConfig, run_infer

        run_infer(InferConfig(model=str(model), inputs=(str(frames),), out=tmp))
        agreement = label_agreement(Path(tmp) / "masks", work / "before_masks" / "masks")
    scale = 1024 / max(FRAME_WH)
    graph = {"network_input_ms": graph_only(model, None, 100),
             "old_feed_1024_ms": graph_only(model, (round(FRAME_WH[1] * scale), 1024), 30)}

    def best(kind: str, overlay: bool) -> dict:
        return max((r for r in rows if r["kind"] == kind and r["overlay"] == overlay), key=lambda r: r["frames_per_s"])

    checks = {
        "images_masks_fps": best("images", False)["frames_per_s"],
        "images_overlay_fps": best("images", True)["frames_per_s"],
        "video_masks_fps": best("video", False)["frames_per_s"],
        "video_overlay_fps": best("video", True)["frames_per_s"],
        "best_masks_ms_over_graph_at_network_input": best("images", False)["ms_per_frame"] / graph["network_input_ms"],
        "best_masks_ms_over_graph_at_old_1024_feed": best("images", False)["ms_per_frame"] / graph["old_feed_1024_ms"],
        "peak_rss_mb_of_the_best_rows": max(best(k, o)["peak_rss_mb"] for k in ("images", "video") for o in (0, 1)),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "label_agreement_with_before": agreement["label_agreement"],
    }
    result = {"host": {**host_info(), "load_average_at_start": load_before}, "model": str(model),
              "frame_size_wh": list(FRAME_WH), "goals": GOALS, "before": before, "rows": rows, "graph_only": graph,
              "agreement": agreement, "checks": checks}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "framerate_cpu.json", result)
    write_text_atomic(RESULTS / "framerate_cpu.md", render(result))
    print(render(result))


def render(result: dict) -> str:
    host, checks, graph = result["host"], result["checks"], result["graph_only"]
    lines = ["# 1080p frames end to end, CPU", "",
             f"{host['processor']}, {host['cpu_count']} cores, load average at start "
             f"{', '.join(f'{v:.1f}' for v in host['load_average_at_start'])}, at end "
             f"{', '.join(f'{v:.1f}' for v in host['load_average_1_5_15'])}. Model: the demo segmenter architecture "
             f"(LR-ASPP MobileNetV3-Large, 64 px), ONNX Runtime fp32. Frames {result['frame_size_wh'][0]}x"
             f"{result['frame_size_wh'][1]}.", "",
             "## Before (the previous `promptseg infer`, image folder)", "",
             "| overlay | frames/s | peak RSS MB |", "| --- | ---: | ---: |"]
    for row in result["before"]:
        lines.append(f"| {'yes' if row['overlay'] else 'no'} | {row['frames_per_s']:.1f} | {row['peak_rss_mb']:.0f} |")
    lines += ["", "## After (`promptseg bench --input`, one subprocess per row)", "",
              format_framerate_table(result["rows"]), "",
              "Per-stage columns: milliseconds per frame, p50/p90; graph = the batch's time / its frames. "
              "Ratio = end-to-end ms per frame / graph-only ms per frame at the same batch and the network's "
              "input size.", "",
              f"Graph alone, batch 1: {graph['network_input_ms']:.2f} ms at the network's input size; "
              f"{graph['old_feed_1024_ms']:.2f} ms at the 1024x576 input the old path fed it.", "",
              "## Checks against the goals", "",
              f"- 1080p masks only: {checks['images_masks_fps']:.1f} frames/s from JPEGs, "
              f"{checks['video_masks_fps']:.1f} from H.264 (goal >= {GOALS['masks_fps']:.0f})",
              f"- with overlays: {checks['images_overlay_fps']:.1f} frames/s from JPEGs, "
              f"{checks['video_overlay_fps']:.1f} from H.264 (goal >= {GOALS['overlay_fps']:.0f})",
              f"- end-to-end ms per frame over the graph's: {checks['best_masks_ms_over_graph_at_network_input']:.1f}x "
              f"the graph at the network's input size, {checks['best_masks_ms_over_graph_at_old_1024_feed']:.2f}x "
              f"the graph at the old 1024 px feed (goal <= {GOALS['end_to_end_over_graph']:.0f}x)",
              f"- peak RSS: {checks['peak_rss_mb_of_the_best_rows']:.0f} MB at most in the four rows above, "
              f"{checks['max_peak_rss_mb']:.0f} MB in the largest row (goal <= {GOALS['peak_rss_mb']:.0f})",
              f"- the same masks: label agreement with the old path {100 * checks['label_agreement_with_before']:.3f}% "
              f"over {result['agreement']['frames']} frames (goal >= {100 * GOALS['label_agreement']:.1f}%)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
