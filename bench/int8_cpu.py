"""Issue-5 benchmark: the CPU-target INT8 model vs the FP32 ONNX vs PyTorch eager FP32, same images.

Calibrates the demo's exported segmenter for ``--target cpu`` (which measures its candidates and
keeps the fastest that passes the accuracy gate, or FP32), then times the three on the same val
images with 2 threads: batch 1 and batch 16, at the images' own 64x64 and upsampled to 512x512
(the graph resizes to its 64x64 input inside, so 512 adds float resize/argmax work that INT8 does
not speed up). Writes ``bench/results/int8_cpu.json`` and ``.md``. Not a test: it takes minutes.

    python bench/int8_cpu.py --model runs/demo/export/segmenter.onnx --data runs/demo/data \
        --seg-run runs/demo/seg_semples
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

# PyTorch eager runs interleaved with ONNX Runtime here: torch's OpenMP threads would spin-wait
# after each op and steal the 2 cores from the next ONNX Runtime run (medians 2-6x the fastest run)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from promptseg.calibration import CalibrationConfig, calibrate  # noqa: E402
from promptseg.calibration.gate import ort_session  # noqa: E402
from promptseg.data.voc import VOCDataset  # noqa: E402
from promptseg.export.exporter import load_segmenter  # noqa: E402
from promptseg.export.wrappers import SegmenterForExport  # noqa: E402
from promptseg.runtime.processing import stack_batch  # noqa: E402

RESULTS = Path(__file__).with_name("results")
GOAL_INT8_VS_FP32 = 1.3
GOAL_BEST_VS_EAGER = 5.0


def _inputs(data: str, size: int, batch: int) -> np.ndarray:
    """``batch`` val images (the first ones of the split), bilinear-resized to ``size`` when it differs."""
    samples = [VOCDataset(data, "val")[i] for i in range(batch)]
    images = [s.load_image() for s in samples]
    if images[0].shape[:2] != (size, size):
        images = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
    return stack_batch(images)


def _time(runners: dict, x: np.ndarray, runs: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """``{name: {"median": s, "min": s}}`` per call, runs interleaved over the runners (rotating start).

    On a shared machine the median carries the load of whatever else runs; the fastest run is the
    closer estimate of the uncontended speed. Both are reported."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name](x)
    times = {name: [] for name in names}
    for r in range(runs):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start = time.perf_counter()
            runners[name](x)
            times[name].append(time.perf_counter() - start)
    return {name: {"median": float(np.median(v)), "min": float(np.min(v))} for name, v in times.items()}


def internal_512(args) -> dict:
    """The same architecture running at 512x512 inside (as for real VOC), random weights: timing only.

    Batch-norm statistics come from one pass over a few demo images so activations stay in range;
    the labels mean nothing, so the gate is opened (max drop 100) and only the latency is kept.
    """
    import tempfile

    from promptseg.export.onnx_export import export_onnx
    from promptseg.runtime.spec import SEGMENTER, read_metadata
    from promptseg.train.cams import imagenet_normalise
    from promptseg.train.seg import Segmenter

    meta = read_metadata(args.model)
    torch.manual_seed(0)
    model = Segmenter("lraspp_mobilenet_v3_large", len(meta.class_names) - 1, 512)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(imagenet_normalise(torch.from_numpy(_inputs(args.data, 64, 8))))
    model.eval()
    with tempfile.TemporaryDirectory(prefix="int8-512-") as tmp:
        path = Path(tmp) / "segmenter.onnx"
        export_onnx(SegmenterForExport(model), SEGMENTER, replace(meta, input_size=(512, 512), method="random"),
                    torch.rand(1, 3, 64, 64), path)
        report = calibrate(CalibrationConfig(model=str(path), out=str(Path(tmp) / "cal"), data=args.data, num=32,
                                             gate_num=16, target="cpu", max_drop=100.0, threads=args.threads,
                                             latency_batch=1, latency_runs=max(args.runs_large, 10)),
                           log=lambda message: print("[512]", message, flush=True))
    return {"candidates": report["candidates"], "chosen": report["chosen"], "note": report["note"],
            "latency": report["latency"]}


def render(result: dict) -> str:
    """The Markdown record, from the JSON one alone (``--from-json`` re-renders without re-measuring)."""
    met = {stat: [cfg for cfg, g in result["goals"].items() if cfg.endswith(f"({stat})") and all(g.values())]
           for stat in ("median", "min")}
    eager_ok = all(g[f"best >= {GOAL_BEST_VS_EAGER}x torch eager"] for g in result["goals"].values())
    summary = [f"Both goals (INT8 >= {GOAL_INT8_VS_FP32}x FP32 ONNX, best >= {GOAL_BEST_VS_EAGER}x PyTorch eager) "
               f"hold in {len(met['median'])} of {len(result['rows'])} configurations by the median "
               f"({', '.join(c.rsplit(' ', 1)[0] for c in met['median']) or 'none'}) and {len(met['min'])} by the "
               f"fastest run ({', '.join(c.rsplit(' ', 1)[0] for c in met['min']) or 'none'}); the PyTorch-eager goal "
               f"holds {'everywhere' if eager_ok else 'not everywhere'}."]
    if len(met["median"]) < len(result["rows"]):
        summary[0] += (" Where INT8 misses 1.3x: the network is small (64x64 inside), so per-op overheads weigh, "
                       "and at 512x512 input the float resizes and the argmax around it take most of the time; "
                       "the last table measures the candidates with the network itself running at 512x512.")
    lines = [
        "# CPU INT8 vs FP32 ONNX vs PyTorch eager (demo segmenter, LR-ASPP MobileNetV3, internal 64x64)", "",
        f"{result['machine']}, {result['threads']} threads, onnxruntime {result['onnxruntime']}, torch "
        f"{result['torch']}; 1-min load average at start {result['load_average_at_start'][0]:.2f} on "
        f"{result['cpu_count']} cores. The backends run interleaved, so load from elsewhere lands on all of them; "
        "both the median and the fastest run are given.", "",
        *summary, "",
        f"CPU target chose **{result['cpu_target_choice']}**: {result['cpu_target_note']}", "",
        f"Accuracy on {result['gate_images']} val images (calibrated on {result['calibration_images']} train images, "
        f"{result['calibration_method']}): mIoU FP32 {result['val_miou_fp32']:.2f}, INT8 ({result['int8_candidate']}) "
        f"{result['val_miou_int8']:.2f}, label agreement {100 * result['val_label_agreement']:.2f}%.", "",
        "## Candidates measured by `promptseg calibrate --target cpu` "
        f"(64x64, batch {result['candidate_latency']['batch']}, ms per image)", "",
        "| candidate | ms/img (b8, median) | ms/img (b8, fastest run) | ms/img (b1, median) | val mIoU | drop | "
        "agreement | gate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in result["candidates_at_calibration"]:
        if "error" in c:
            lines.append(f"| {c['name']} | failed: {c['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {c['name']} | {c['latency_ms']:.3f} | {c['latency_ms_min']:.3f} | "
                     f"{c['latency_ms_batch1']:.3f} | {c['miou']:.2f} | {c['miou_drop']:.2f} | "
                     f"{100 * c['label_agreement']:.2f}% | "
                     f"{'chosen' if c['chosen'] else ('pass' if c['passed'] else 'fail')} |")
    lines += ["", f"## Same val images, three backends (INT8 = {result['int8_candidate']})", "",
              "ms per image, median of the interleaved runs and, in brackets, the fastest run (the closer "
              "estimate of the uncontended speed on this shared machine); speed-ups likewise.", "",
              "| input | batch | INT8 ONNX | FP32 ONNX | PyTorch eager | INT8 vs FP32 | best ONNX vs eager | "
              "INT8/FP32 label agreement | load |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        med, low = r["median"], r["min"]
        ms = [f"{med['ms_per_image'][k]:.2f} ({low['ms_per_image'][k]:.2f})"
              for k in ("int8_onnx", "fp32_onnx", "torch_eager_fp32")]
        lines.append(f"| {r['size']}x{r['size']} | {r['batch']} | {' | '.join(ms)} | "
                     f"{med['int8_vs_fp32_onnx']:.2f}x ({low['int8_vs_fp32_onnx']:.2f}x) | "
                     f"{med['best_onnx_vs_torch_eager']:.1f}x ({low['best_onnx_vs_torch_eager']:.1f}x) | "
                     f"{100 * r['int8_fp32_label_agreement']:.2f}% | {r['load_average_1min']:.1f} |")
    lines += ["", f"Goals: INT8 >= {GOAL_INT8_VS_FP32}x FP32 ONNX, best >= {GOAL_BEST_VS_EAGER}x PyTorch eager.", ""]
    lines += [f"- {cfg}: " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in g.items())
              for cfg, g in result["goals"].items()]
    lines.append("")
    net512 = result["network_at_512"]
    if net512:
        lines += ["## The same network running at 512x512 inside (random weights: latency only)", "",
                  "The demo network runs at 64x64, so at 512x512 input most of the time goes to float resizes and "
                  "the argmax that INT8 leaves alone. A segmenter trained at 512 (as for VOC) spends it in the "
                  f"convolutions instead; `promptseg calibrate --target cpu` on such a model (batch 1, "
                  f"{result['threads']} threads, ms per image):", "",
                  "| candidate | ms/img b1, median (fastest run) | vs FP32, median (fastest run) |",
                  "| --- | ---: | ---: |"]
        fp32 = next(c for c in net512["candidates"] if c["name"] == "fp32")
        for c in net512["candidates"]:
            if "error" in c:
                lines.append(f"| {c['name']} | failed: {c['error'][:60]} | |")
                continue
            lines.append(f"| {c['name']}{' (chosen)' if c['chosen'] else ''} | {c['latency_ms']:.2f} "
                         f"({c['latency_ms_min']:.2f}) | {fp32['latency_ms'] / c['latency_ms']:.2f}x "
                         f"({fp32['latency_ms_min'] / c['latency_ms_min']:.2f}x) |")
        lines += ["", f"Decision: {net512['note']}", ""]
    return "\n".join(lines)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/export/segmenter.onnx")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--seg-run", default="runs/demo/seg_semples", help="the segmenter's training run (PyTorch)")
    parser.add_argument("--calibration-out", default="runs/demo/export/calibration-cpu")
    parser.add_argument("--num", type=int, default=256, help="calibration images (train split)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-small", type=int, default=40, help="timed runs per backend at 64x64")
    parser.add_argument("--runs-large", type=int, default=10, help="timed runs per backend at 512x512")
    parser.add_argument("--latency-runs", type=int, default=40, help="timed runs per CPU candidate when calibrating")
    parser.add_argument("--skip-512-net", action="store_true",
                        help="skip the extra table of CPU candidates for the network running at 512x512 inside")
    parser.add_argument("--from-json", action="store_true",
                        help="only re-render bench/results/int8_cpu.md from bench/results/int8_cpu.json")
    args = parser.parse_args()
    if args.from_json:
        text = render(json.loads((RESULTS / "int8_cpu.json").read_text()))
        (RESULTS / "int8_cpu.md").write_text(text)
        print(text)
        return

    started = time.perf_counter()
    load_start = os.getloadavg()
    report = calibrate(CalibrationConfig(model=args.model, out=args.calibration_out, data=args.data, num=args.num,
                                         target="cpu", threads=args.threads, latency_runs=args.latency_runs),
                       log=lambda message: print(message, flush=True))
    cpu_model = Path(args.calibration_out) / report["output"]
    int8_model, int8_name, kept_fp32 = cpu_model, report["chosen"], report["chosen"] == "fp32"
    if kept_fp32:  # the tool kept FP32; time the fastest INT8 that passed anyway, to show by how much it lost
        again = calibrate(CalibrationConfig(model=args.model, out=args.calibration_out + "-int8", data=args.data,
                                            num=args.num, target="cpu", threads=args.threads, min_speedup=1.0,
                                            latency_runs=args.latency_runs,
                                            cpu_candidates=(report["int8_candidate"],)))
        int8_model, int8_name = Path(args.calibration_out + "-int8") / again["output"], again["chosen"]

    torch.set_num_threads(args.threads)
    segmenter, _ = load_segmenter(Path(args.seg_run))
    eager = SegmenterForExport(segmenter).eval()
    sessions = {"int8": ort_session(int8_model, args.threads), "fp32_onnx": ort_session(args.model, args.threads)}

    def torch_run(x: np.ndarray):
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    runners = {"int8_onnx": lambda x: sessions["int8"].run(None, {"image": x}),
               "fp32_onnx": lambda x: sessions["fp32_onnx"].run(None, {"image": x}),
               "torch_eager_fp32": torch_run}
    rows = []
    for size in (64, 512):
        for batch in (1, 16):
            x = _inputs(args.data, size, batch)
            labels = {name: np.asarray(run(x)[1]) for name, run in runners.items()}
            agreement = float((labels["int8_onnx"] == labels["fp32_onnx"]).mean())
            seconds = _time(runners, x, args.runs_small if size == 64 else args.runs_large)
            row = {"size": size, "batch": batch, "int8_fp32_label_agreement": round(agreement, 5),
                   "load_average_1min": round(os.getloadavg()[0], 2)}
            for stat in ("median", "min"):
                ms = {name: 1000 * v[stat] for name, v in seconds.items()}
                best = min(ms["int8_onnx"], ms["fp32_onnx"])
                row[stat] = {"ms_per_batch": {k: round(v, 3) for k, v in ms.items()},
                             "ms_per_image": {k: round(v / batch, 3) for k, v in ms.items()},
                             "int8_vs_fp32_onnx": round(ms["fp32_onnx"] / ms["int8_onnx"], 3),
                             "best_onnx_vs_torch_eager": round(ms["torch_eager_fp32"] / best, 3)}
            rows.append(row)
            print(rows[-1], flush=True)

    net512 = None if args.skip_512_net else internal_512(args)
    goals = {f"{r['size']}px b{r['batch']} ({stat})": {
        f"int8 >= {GOAL_INT8_VS_FP32}x fp32 onnx": r[stat]["int8_vs_fp32_onnx"] >= GOAL_INT8_VS_FP32,
        f"best >= {GOAL_BEST_VS_EAGER}x torch eager": r[stat]["best_onnx_vs_torch_eager"] >= GOAL_BEST_VS_EAGER}
        for r in rows for stat in ("median", "min")}
    result = {
        "model": args.model, "int8_model": str(int8_model), "int8_candidate": int8_name,
        "cpu_target_choice": report["chosen"], "cpu_target_kept_fp32": kept_fp32, "cpu_target_note": report["note"],
        "threads": args.threads, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__, "torch": torch.__version__,
        "load_average_at_start": [round(v, 2) for v in load_start],
        "val_miou_fp32": report["miou_fp32"], "val_miou_int8": report["miou_int8"],
        "val_label_agreement": report["label_agreement"], "gate_images": report["gate"]["used"],
        "calibration_images": report["num_images"], "calibration_method": report["method"],
        "candidates_at_calibration": report["candidates"], "candidate_latency": report["latency"],
        "rows": rows, "goals": goals, "network_at_512": net512, "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_cpu.json").write_text(json.dumps(result, indent=2) + "\n")

    (RESULTS / "int8_cpu.md").write_text(render(result))
    print(render(result))

if __name__ == "__main__":
    main()
