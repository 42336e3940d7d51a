"""Issue-23 benchmark: INT8 that never collapses silently, on the demo's own networks at full size.

Builds what the demo ships, with promptseg's own code: a synthetic world, an LR-ASPP segmenter
trained on its ground truth (the demo's architecture and input size), and the CAM network of the
package's prebuilt backbone run (ResNet-18 trunk, its val-chosen threshold). Then
``calibrate --target tensorrt`` on 256 calibration images, gated on every val image, for:

- ``segmenter``: the network as trained;
- ``segmenter-outlier``: the issue's defect, one channel of the first Conv -> ReLU -> Conv pair
  scaled by 300 before the ReLU and by 1/300 in the next convolution (FP32 outputs unchanged);
- ``cam``: the CAM network, gated on its pseudo-masks.

Writes ``bench/results/int8_repair.json`` and ``.md``: per model the plain and repaired drop, each
repair step with its drop and ONNX Runtime CPU latency, what was done to which layer, the layer
ranked first, and the drop with 16, 64 and 256 calibration images. Not a test: it takes about half
an hour on two shared cores (the load is recorded).

    python bench/int8_repair.py --work /tmp/int8_repair
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from promptseg import __version__
from promptseg.calibration import CalibrationConfig, CalibrationGateError, calibrate
from promptseg.calibration.equalise import find_pairs, scale_pair
from promptseg.calibration.gate import ort_session
from promptseg.data.synth import SynthConfig, write_world
from promptseg.data.voc import VOCDataset
from promptseg.export.exporter import load_segmenter
from promptseg.export.onnx_export import export_onnx
from promptseg.export.wrappers import CamForExport, SegmenterForExport
from promptseg.io import read_json
from promptseg.prebuilt import PREBUILT_DIR
from promptseg.runtime.spec import CAM, SEGMENTER, ModelMetadata
from promptseg.train.cams import IMAGENET_MEAN, IMAGENET_STD

RESULTS = Path(__file__).with_name("results")
OUTLIER_FACTOR = 300.0


def _metadata(kind: str, names: tuple[str, ...], extra: dict | None = None) -> ModelMetadata:
    palette = tuple((37 * k % 256, 91 * k % 256, 151 * k % 256) for k in range(len(names)))
    return ModelMetadata(kind=kind, class_names=names, palette=palette, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         input_size=(64, 64), method="bench", promptseg_version=__version__, extra=extra or {})


def build_segmenter(work: Path, data: Path, epochs: int, threads: int) -> Path:
    """An LR-ASPP trained on the world's ground truth, exported as the demo exports it."""
    from promptseg.train.seg import SegTrainConfig, train_segmenter

    path = work / "segmenter.onnx"
    if path.is_file():
        return path
    run = work / "seg"
    train_segmenter(SegTrainConfig(data=str(data), out=str(run), input_size=64, epochs=epochs, threads=threads),
                    show_progress=True)
    model, classes = load_segmenter(run)
    example = torch.rand(2, 3, 64, 64)
    export_onnx(SegmenterForExport(model), SEGMENTER, _metadata("segmenter", ("background", *classes)), example, path)
    return path


def build_cam(work: Path, data: Path) -> Path:
    """The prebuilt backbone run's CAM network (the demo's CAM architecture), with its threshold."""
    from promptseg.configs import from_dict
    from promptseg.train.cam_net import CamNet, CamNetConfig
    from promptseg.train.checkpoint import load_checkpoint

    path = work / "cam.onnx"
    if path.is_file():
        return path
    run = PREBUILT_DIR / "pretrain"
    manifest = read_json(PREBUILT_DIR / "manifest.json")
    state = load_checkpoint(run / "cam_net.pt")
    net = CamNet(from_dict(CamNetConfig, manifest["stage_configs"]["pretrain"]["net"]), state["num_classes"])
    net.load_state_dict(state["net"])
    classes = tuple(VOCDataset(data, "train").class_names)
    threshold = read_json(run / "report.json")["background_threshold"]
    meta = _metadata("cam", classes, {"cam_threshold": str(threshold)})
    export_onnx(CamForExport(net.eval()), CAM, meta, torch.rand(2, 3, 64, 64), path)
    return path


def plant_outlier(source: Path, out: Path) -> dict:
    """The issue's variant: channel 0 of the first Conv -> ReLU -> Conv pair x300 before the ReLU, /300 after."""
    model = onnx.load(str(source))
    pair = next(p for p in find_pairs(model) if p.activation == "Relu")
    channels = next(i for i in model.graph.initializer
                    if i.name == next(n for n in model.graph.node if n.name == pair.first).input[1]).dims[0]
    scales = np.ones(channels)
    scales[0] = 1.0 / OUTLIER_FACTOR
    scale_pair(model, pair, scales)
    onnx.save(model, str(out))
    x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    before, after = (ort_session(p, 2).run(["logits"], {"image": x})[0] for p in (source, out))
    return {"first": pair.first, "second": pair.second, "tensor": pair.tensor, "channel": 0,
            "factor": OUTLIER_FACTOR, "fp32_max_abs_diff": float(np.abs(after - before).max())}


def summarise(name: str, report: dict, seconds: float) -> dict:
    repair = report["repair"]
    steps = [{k: s.get(k) for k in ("step", "drop", "passed", "kept", "latency_ms", "latency_cost_ms", "layers")}
             for s in repair["steps"]]
    return {"model": name, "kind": report["kind"], "gate_passed": report["gate_passed"],
            "miou_fp32": report["miou_fp32"], "miou_int8": report["miou_int8"], "drop_plain": steps[0]["drop"],
            "drop_final": report["miou_drop"], "foreground_agreement": report["foreground_agreement"],
            "per_class_iou": report["per_class_iou"], "steps": steps, "repairs": repair["repairs"],
            "culprit": repair["culprit"], "calibration_images": repair["calibration_images"],
            "layers": len(repair["sensitivity"][0]["layers"]),
            "kept_float": [r["layer"] for r in repair["repairs"] if r["action"].startswith("kept float")],
            "gate_images": report["gate"]["used"], "note": report["note"], "seconds": round(seconds, 1),
            "calibrate_seconds": report["seconds"], "load_average_1min": report["latency"]["load_average_1min"]}


def render(result: dict) -> str:
    lines = ["# INT8 repair on the demo's networks (issue 23)", "",
             f"{result['machine']}, {result['threads']} threads, onnxruntime {result['onnxruntime']}; load average "
             f"at start {result['load_average_at_start']} (a shared machine: latencies carry the load).",
             f"Segmenter: LR-ASPP, 64 px, trained {result['segmenter_epochs']} epochs on the ground truth of a "
             f"{result['world']['train']}-image world. CAM: the prebuilt backbone run. Gate: every val image "
             f"({result['world']['val']}), max drop 1.0; 256 calibration images from train.", "",
             f"Planted outlier: {json.dumps(result['plant'])}.", "",
             "| model | layers | FP32 mIoU | plain drop | final drop | gate | kept float | first in the ranking |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in result["models"]:
        lines.append(f"| {row['model']} | {row['layers']} | {row['miou_fp32']:.2f} | {row['drop_plain']:.2f} | "
                     f"{row['drop_final']:.2f} | {'passed' if row['gate_passed'] else 'FAILED'} | "
                     f"{', '.join(row['kept_float']) or '-'} | {row['culprit']['layer']} |")
    for row in result["models"]:
        lines += ["", f"## {row['model']}", "", "| step | drop | kept | CPU ms/img | cost ms |",
                  "| --- | ---: | --- | ---: | ---: |"]
        for s in row["steps"]:
            ms = "-" if s["latency_ms"] is None else f"{s['latency_ms']:.3f}"
            cost = "-" if s["latency_cost_ms"] is None else f"{s['latency_cost_ms']:+.3f}"
            lines.append(f"| {s['step']} | {s['drop']:.2f} | {s['kept']} | {ms} | {cost} |")
        lines += ["", "Repairs: " + ("; ".join(f"{r.get('layer', r.get('tensor'))}: {r['action']}"
                                               for r in row["repairs"]) or "none"),
                  "", "| calibration images | drop plain | drop repaired |", "| ---: | ---: | ---: |"]
        for c in row["calibration_images"]:
            if c["drop_plain"] is not None:
                lines.append(f"| {c['images']} | {c['drop_plain']:.2f} | {c['drop_repaired']:.2f} |")
        lines.append(f"\n{row['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/promptseg-int8-repair", help="world, training run, ONNX files")
    parser.add_argument("--train", type=int, default=800, help="train images of the world")
    parser.add_argument("--val", type=int, default=200, help="val images (the gate)")
    parser.add_argument("--epochs", type=int, default=8, help="segmenter training epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-json", action="store_true", help="only re-render the .md from the .json")
    args = parser.parse_args()
    if args.from_json:
        text = render(json.loads((RESULTS / "int8_repair.json").read_text()))
        (RESULTS / "int8_repair.md").write_text(text)
        print(text)
        return
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    data = work / "data"
    if not (data / "classes.json").is_file():
        write_world(data, SynthConfig(seed=0, train=args.train, val=args.val, clip_images=0))
    segmenter = build_segmenter(work, data, args.epochs, args.threads)
    plant = plant_outlier(segmenter, work / "segmenter-outlier.onnx")
    cam = build_cam(work, data)
    rows = []
    for name, model in (("segmenter", segmenter), ("segmenter-outlier", work / "segmenter-outlier.onnx"),
                        ("cam", cam)):
        started = time.perf_counter()
        cfg = CalibrationConfig(model=str(model), out=str(work / f"int8-{name}"), data=str(data), target="tensorrt",
                                threads=args.threads)
        try:
            report = calibrate(cfg, log=lambda message: print(message, flush=True))
        except CalibrationGateError as exc:
            report = exc.report
        rows.append(summarise(name, report, time.perf_counter() - started))
        print(json.dumps(rows[-1], indent=1)[:2000], flush=True)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
              "load_average_at_start": [round(v, 2) for v in load_start],
              "world": {"train": args.train, "val": args.val, "seed": 0}, "segmenter_epochs": args.epochs,
              "plant": plant, "models": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_repair.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "int8_repair.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
