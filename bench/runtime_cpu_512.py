"""Issue-18 benchmark record: the shipped segmenter architecture (LR-ASPP MobileNetV3-Large) exported
running at 512x512 inside, on every CPU backend x precision this machine has, batch 1 and 8, in one run.

Rows: PyTorch eager fp32 (and bf16 autocast where the CPU has bf16 units); ONNX Runtime fp32 and
its INT8 forms (QDQ u8, QDQ s8, QOperator u8, from one calibration); OpenVINO fp32, bf16 (where
the CPU lists BF16), and int8 on ONNX Runtime's QDQ models and on NNCF's own (same calibration
images). Each runtime row is one ``promptseg.runtime.bench`` row (a fresh subprocess; random images
at 512x512, so the graph's resizes are identities); eager rows time the export wrapper in this
process. Every row gets its speed-up over PyTorch eager fp32 and its distance from the FLOP floor:
GFLOP per image (PyTorch's counter) over the fp32 matmul peak measured at the start, same threads.

Weights: no model trained at 512 exists here, and training one takes about 1.3 s per image on two
cores, so the network is made the way the calibration tests make theirs: random backbone,
batch-norm statistics from one pass over the train images at 512, the two 1x1 classifiers fitted in
closed form (ridge regression of one-hot labels on their input features). Its labels depend on the
image, which is what INT8/bf16 can damage; the timing depends only on the architecture. Accuracy:
each row's model and backend against ONNX Runtime fp32 on held-out val images (``compare``).

    python bench/runtime_cpu_512.py                 # world, model and INT8 forms under runs/runtime_cpu_512/
    python bench/runtime_cpu_512.py --from-json     # re-render the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# PyTorch's OpenMP threads must not spin-wait on the cores while the runtime rows run
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from promptseg import __version__  # noqa: E402
from promptseg.calibration.config import CPU_CANDIDATES, Method  # noqa: E402
from promptseg.calibration.images import ImageBatches, select_images  # noqa: E402
from promptseg.calibration.openvino import quantize_nncf  # noqa: E402
from promptseg.calibration.quantize import compute_ranges, quantization_record, quantize_cpu  # noqa: E402
from promptseg.data.synth import SynthConfig, write_world  # noqa: E402
from promptseg.data.voc import VOCDataset  # noqa: E402
from promptseg.export.onnx_export import export_onnx  # noqa: E402
from promptseg.export.wrappers import SegmenterForExport  # noqa: E402
from promptseg.io import write_json_atomic, write_text_atomic  # noqa: E402
from promptseg.runtime.backends import BackendOptions  # noqa: E402
from promptseg.runtime.bench import BenchConfig, bench_row, host_info  # noqa: E402
from promptseg.runtime.compare import CompareConfig, compare_models  # noqa: E402
from promptseg.runtime.processing import stack_batch  # noqa: E402
from promptseg.runtime.spec import SEGMENTER, ModelMetadata  # noqa: E402
from promptseg.train.cams import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalise  # noqa: E402
from promptseg.train.hardware import count_flops, cpu_has_bf16, matmul_peak_gflops  # noqa: E402
from promptseg.train.seg import Segmenter  # noqa: E402

RESULTS = Path(__file__).with_name("results")
ARCH = "lraspp_mobilenet_v3_large"
SIZE = 512
BATCHES = (1, 8)
ORT_INT8 = ("qdq-u8-all", "qdq-s8-all", "qop-u8-all")  # the issue's ONNX Runtime INT8 forms
NNCF_INT8 = ("nncf-s8", "nncf-u8")
GOAL_VS_ORT_FP32, GOAL_VS_EAGER, MAX_DROP = 1.5, 4.0, 1.0


@dataclass(frozen=True)
class Variant:
    """One row family: a model file (by key) on a backend at a requested precision."""

    model: str
    backend: str
    precision: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.model}" + (f" @{self.precision}" if self.precision else "")


# ----------------------------------------------------------------------------- the network at 512


def _train_batches(dataset: VOCDataset, batch: int):
    for start in range(0, len(dataset), batch):
        samples = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        x = torch.from_numpy(np.stack([s.load_image() for s in samples])).permute(0, 3, 1, 2).float() / 255
        yield x, torch.from_numpy(np.stack([s.load_mask() for s in samples]).astype(np.int64))


@torch.no_grad()
def fitted_segmenter(data: Path, size: int, batch: int = 16) -> Segmenter:
    """The architecture at ``size`` inside: random backbone, batch-norm statistics of the train split
    (cumulative over one pass), both 1x1 classifiers by weighted ridge regression (background 0.1)
    on their input features at stride 8, accumulated batch by batch."""
    torch.manual_seed(0)
    train = VOCDataset(data, "train")
    classes = train.num_classes + 1
    model = Segmenter(ARCH, train.num_classes, size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for x, _ in _train_batches(train, batch):
        model(imagenet_normalise(x))
    model.eval()
    head, feats = model.net.classifier, {}
    hooks = [head.low_classifier.register_forward_hook(lambda m, i, o: feats.__setitem__("low", i[0])),
             head.high_classifier.register_forward_hook(lambda m, i, o: feats.__setitem__("high", i[0]))]
    gram, rhs = None, None
    for x, y in _train_batches(train, batch):
        model(imagenet_normalise(x))
        low, high = feats["low"], feats["high"]
        target = F.interpolate(y[:, None].float(), size=low.shape[-2:], mode="nearest").reshape(-1).long()
        f = torch.cat([low, high, torch.ones_like(low[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, 1 + low.shape[1]
                                                                                               + high.shape[1])
        keep = target != 255
        f, target = f[keep].double(), target[keep]
        w = torch.where(target == 0, 0.1, 1.0).double()[:, None]
        g, r = f.T @ (f * w), f.T @ (F.one_hot(target, classes).double() * w)
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    for hook in hooks:
        hook.remove()
    solution = torch.linalg.solve(gram + 1e-2 * torch.eye(len(gram), dtype=torch.float64), rhs).float()
    n_low, n_high = low.shape[1], high.shape[1]
    head.low_classifier.weight.copy_(solution[:n_low].T[:, :, None, None])
    head.low_classifier.bias.copy_(solution[-1])
    head.high_classifier.weight.copy_(solution[n_low:n_low + n_high].T[:, :, None, None])
    head.high_classifier.bias.zero_()
    return model


def export_512(model: Segmenter, data: Path, path: Path) -> Path:
    from promptseg.data.palette import voc_palette

    names = ("background", *VOCDataset(data, "train").class_names)
    palette = tuple(tuple(int(c) for c in rgb) for rgb in voc_palette(256)[: len(names)])
    meta = ModelMetadata(kind="segmenter", class_names=names, palette=palette, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         input_size=(SIZE, SIZE), method="fitted-512", promptseg_version=__version__)
    export_onnx(SegmenterForExport(model.eval()), SEGMENTER, meta, torch.rand(2, 3, 128, 128), path)
    return path


def int8_models(fp32: Path, data: Path, out: Path, num: int) -> dict[str, Path]:
    """ONNX Runtime's INT8 forms from one min/max calibration and NNCF's from the same images."""
    meta_names = VOCDataset(data, "train").class_names
    selection = select_images(data=str(data), images=None, split="train", gate_split="val", num=num, gate_num=1,
                              class_names=meta_names)
    calib = ImageBatches(selection.calibration, batch=8).check()
    models = {"fp32": fp32}
    ranges = compute_ranges(fp32, calib, Method.MINMAX, 99.999, False, out)
    cache = ranges.save_ort(out / "ort_calibration_cache.json")
    for candidate in (c for c in CPU_CANDIDATES if c.name in ORT_INT8):
        extra = {"precision": "int8", "quantization": quantization_record(
            target="cpu", format=candidate.format, activation=candidate.activation, ops=candidate.ops,
            method="minmax", num_images=ranges.num_images)}
        models[candidate.name] = out / f"{candidate.name}.onnx"
        quantize_cpu(candidate, fp32, models[candidate.name], cache, ranges, extra)
    for name in NNCF_INT8:
        activation = name.split("-")[1]
        extra = {"precision": "int8", "quantization": quantization_record(
            target="cpu", format="qdq", activation=activation, quantizer="nncf", num_images=len(calib.refs))}
        models[name] = out / f"{name}.onnx"
        quantize_nncf(fp32, models[name], calib, activation, extra)
    return models


# ----------------------------------------------------------------------------- timing


def eager_row(module: torch.nn.Module, batch: int, warmup: int, iters: int, bf16: bool) -> dict:
    """PyTorch eager latency on the same random images as the runtime rows (inference mode)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(stack_batch([rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(batch)]))
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + iters):
            tick = time.perf_counter()
            module(x)
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - tick))
    precision = "bf16" if bf16 else "fp32"
    return {"backend": "pytorch-eager", "model": "fp32 weights", "variant": f"pytorch-eager {precision}",
            "precision": precision, "precision_note": "", "batch": batch, "min_ms": float(np.min(times)),
            "p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "throughput": batch * len(times) / (sum(times) / 1e3), "iters": iters, "warmup": warmup}


def runtime_rows(variants: list[Variant], models: dict[str, Path], args) -> list[dict]:
    rows = []
    for batch in BATCHES:
        iters, warmup = (args.iters, args.warmup) if batch == 1 else (args.iters_batched, args.warmup_batched)
        for v in variants:
            cfg = BenchConfig(models=(str(models[v.model]),), backends=(v.backend,), batches=(batch,), warmup=warmup,
                              iters=iters, options=BackendOptions(threads=args.threads, precision=v.precision))
            row = bench_row(str(models[v.model]), v.backend, batch, cfg.validate())
            row.update(model=v.model, variant=v.label, load_1min=round(os.getloadavg()[0], 2))
            rows.append(row)
            print(f"{v.label:36s} batch {batch}: p50 {row['p50_ms']:8.1f} ms ({row['precision']}) "
                  f"load {row['load_1min']}", flush=True)
    return rows


HEAD_TO_HEAD = (Variant("fp32", "onnxruntime"), Variant("qop-u8-all", "onnxruntime"),
                Variant("fp32", "openvino", "fp32"), Variant("qdq-u8-all", "openvino", "int8"),
                Variant("nncf-u8", "openvino", "int8"))


def head_to_head(eager: torch.nn.Module, models: dict[str, Path], args) -> dict:
    """The fp32 references and the fastest forms again, in ``args.rounds`` rounds with a rotating
    order: each a fresh bench subprocess (eager in this process), so a minute of heavy load from
    elsewhere spoils one round of each rather than one form's only row; each keeps its best round.
    (Timing them interleaved in one process does not work: each runtime's idle thread pool spins
    while the next one runs.) ``{batch: {label: {"p50": [ms per round], "min": [...]}}}``."""
    labels = [v.label for v in HEAD_TO_HEAD] + ["pytorch-eager fp32"]
    result = {str(b): {label: {"p50": [], "min": []} for label in labels} for b in BATCHES}
    for k in range(args.rounds):
        order = labels[k % len(labels):] + labels[:k % len(labels)]
        for batch in BATCHES:
            iters, warmup = (args.iters, args.warmup) if batch == 1 else (args.iters_batched, args.warmup_batched)
            for label in order:
                if label == "pytorch-eager fp32":
                    row = eager_row(eager, batch, warmup, iters, False)
                else:
                    v = next(v for v in HEAD_TO_HEAD if v.label == label)
                    cfg = BenchConfig(models=(str(models[v.model]),), backends=(v.backend,), batches=(batch,),
                                      warmup=warmup, iters=iters,
                                      options=BackendOptions(threads=args.threads, precision=v.precision))
                    row = bench_row(str(models[v.model]), v.backend, batch, cfg.validate())
                result[str(batch)][label]["p50"].append(row["p50_ms"])
                result[str(batch)][label]["min"].append(row["min_ms"])
            print(f"round {k + 1}, batch {batch}: " + ", ".join(
                f"{label} {result[str(batch)][label]['p50'][-1]:.0f}" for label in labels), flush=True)
    return {"rounds": args.rounds, "load_1min_end": round(os.getloadavg()[0], 2), "ms": result}


# ----------------------------------------------------------------------------- the record


STATS = ("p50", "min")  # the median carries the neighbours' load; the fastest run is closer to the CPU's own speed


def _add_ratios(rows: list[dict], floor_ms_per_image: float) -> None:
    """Per row and statistic: ms per image, speed-ups over PyTorch eager fp32 and ONNX Runtime fp32
    at the same batch, and ms per image over the FLOP floor."""
    for row in rows:
        eager = next(r for r in rows if r["backend"] == "pytorch-eager" and r["precision"] == "fp32"
                     and r["batch"] == row["batch"])
        ort = next(r for r in rows if r["backend"] == "onnxruntime" and r["model"] == "fp32"
                   and r["batch"] == row["batch"])
        for stat in STATS:
            key = f"{stat}_ms"
            row[f"ms_per_image_{stat}"] = row[key] / row["batch"]
            row[f"vs_eager_fp32_{stat}"] = eager[key] / row[key]
            row[f"vs_onnxruntime_fp32_{stat}"] = ort[key] / row[key]
            row[f"x_flop_floor_{stat}"] = row[f"ms_per_image_{stat}"] / floor_ms_per_image


def _goal(label: str, precision: str, ms: float, ort_ms: float, eager_ms: float) -> dict:
    return {"best": label, "precision": precision, "ms": round(ms, 2), "vs_onnxruntime_fp32": round(ort_ms / ms, 3),
            "vs_eager_fp32": round(eager_ms / ms, 3), "ok_vs_onnxruntime_fp32": ort_ms / ms >= GOAL_VS_ORT_FP32,
            "ok_vs_eager_fp32": eager_ms / ms >= GOAL_VS_EAGER}


def _checks(rows: list[dict], accuracy: dict[str, dict], h2h: dict | None) -> dict:
    """The issue's acceptance on this machine: per batch and statistic, the fastest form whose accuracy
    holds, against the goals; from the single rows and, where measured, from the head-to-head rounds
    (the figures to trust on a loaded machine)."""
    fp32_miou = accuracy["onnxruntime fp32"]["miou_a"]
    checks = {"accuracy": {}, "speed": {}}
    for label, acc in accuracy.items():
        drop = 100 * (fp32_miou - acc["miou_b"])
        checks["accuracy"][label] = {"miou_drop": round(drop, 3), "ok": drop <= MAX_DROP,
                                     "within": abs(drop) <= MAX_DROP}
    for batch in BATCHES:
        eligible = [r for r in rows if r["batch"] == batch and r["backend"] != "pytorch-eager"
                    and checks["accuracy"][r["variant"]]["ok"]]
        for stat in STATS:
            best = min(eligible, key=lambda r, key=f"{stat}_ms": r[key])
            ms = best[f"{stat}_ms"]
            checks["speed"][f"batch {batch}, {stat}"] = _goal(
                best["variant"], best["precision"], ms, ms * best[f"vs_onnxruntime_fp32_{stat}"],
                ms * best[f"vs_eager_fp32_{stat}"])
    if h2h:
        checks["head_to_head"] = {}
        precisions = {r["variant"]: r["precision"] for r in rows}
        for batch, forms in h2h["ms"].items():
            for stat in STATS:
                best = {label: min(v[stat]) for label, v in forms.items()}
                eligible = [label for label in best if label in accuracy and checks["accuracy"][label]["ok"]]
                label = min(eligible, key=best.__getitem__)
                checks["head_to_head"][f"batch {batch}, {stat}"] = _goal(
                    label, precisions[label], best[label], best["onnxruntime fp32"], best["pytorch-eager fp32"])
    return checks


def render(result: dict) -> str:
    """The Markdown record, from the JSON alone."""
    host, model = result["host"], result["model"]
    lines = [f"# Runtime on CPU at 512x512 inside: {model['arch']}, every backend x precision", "",
             f"CPU **{host['cpu']}** ({host['cpu_count']} cores; OpenVINO CPU capabilities: "
             f"{', '.join(result['openvino_capabilities'])}; bf16 units: {'yes' if result['cpu_bf16_units'] else 'no'}"
             f"), {result['threads']} threads; onnxruntime {host['onnxruntime']}, openvino {host['openvino']}, torch "
             f"{result['torch']}. Load average (1 min) {result['load_1min_start']} at the start, "
             f"{result['load_1min_end']} at the end, on a machine shared with other agents: ratios within one run "
             f"matter more than the absolute ms.", "",
             f"Model: {model['gflop_per_image']:.2f} GFLOP per 512x512 image (PyTorch's counter); fp32 matmul peak "
             f"{result['peak_gflops_fp32']:.1f} GFLOP/s at {result['threads']} threads (the better of the start and "
             f"the end: {', '.join(f'{p:.1f}' for p in result['peak_gflops_fp32_start_end'])}), so the FLOP floor is "
             f"{result['floor_ms_per_image']:.1f} ms per image. Weights: {model['weights']}", "",
             f"Latency per batch: p50 and, in brackets, the fastest of {result['iters']} (batch 1) / "
             f"{result['iters_batched']} (batch 8) timed iterations after warm-up, inference only; ratios likewise "
             "(p50 ratio, fastest-run ratio), within this run; `x floor` = ms per image / FLOP floor; cold = imports "
             "+ session or compile in a fresh process; load = 1-min load average after the row.", "",
             "| backend | model | prec | batch | ms | ms/img | vs eager fp32 | vs ORT fp32 | x floor | cold s | RSS MB "
             "| load |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def both(r: dict, key: str, fmt: str) -> str:
        return f"{format(r[f'{key}_p50'], fmt)} ({format(r[f'{key}_min'], fmt)})"

    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['model']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.1f} "
                     f"({r['min_ms']:.1f}) | {both(r, 'ms_per_image', '.1f')} | {both(r, 'vs_eager_fp32', '.2f')} | "
                     f"{both(r, 'vs_onnxruntime_fp32', '.2f')} | {both(r, 'x_flop_floor', '.2f')} | "
                     f"{format(r['cold_start_s'], '.2f') if 'cold_start_s' in r else '-'} | "
                     f"{format(r['peak_rss_mb'], '.0f') if r.get('peak_rss_mb') else '-'} | "
                     f"{r.get('load_1min', '-')} |")
    notes = sorted({r["precision_note"] for r in result["rows"] if r.get("precision_note")})
    lines += ["", *[f"- note: {n}" for n in notes], *[f"- not run: {n}" for n in result["not_run"]], ""]
    acc = result["accuracy"]
    first = next(iter(acc.values()))
    lines += [f"## Accuracy on {first['images']} held-out val images (against ONNX Runtime fp32, mIoU "
              f"{100 * first['miou_a']:.1f})", "",
              "| backend + model | prec | mIoU | drop | label agreement | max abs logit diff |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, a in acc.items():
        lines.append(f"| {label} | {a['precision_b']} | {100 * a['miou_b']:.1f} | "
                     f"{100 * (a['miou_a'] - a['miou_b']):+.2f} | {100 * a['label_agreement']:.2f}% | "
                     f"{a['max_abs_diff']:.3g} |")
    checks = result["checks"]
    reduced = {k: v for k, v in checks["accuracy"].items() if k != "onnxruntime fp32"}
    outside = [k for k, v in reduced.items() if not v["within"]]
    lines += ["", "## Acceptance (issue 18) on this CPU", "",
              f"mIoU drop against fp32 at most {MAX_DROP} (the calibration gate's rule; drop = fp32 - row): "
              + ", ".join(f"{k} {'ok' if v['ok'] else 'NO'} ({v['miou_drop']:+.2f})" for k, v in reduced.items())
              + f". Within {MAX_DROP} either way: " + (f"all but {', '.join(outside)}" if outside else "all") + ".",
              ""]
    for title, key in (("Head to head (best of the rounds below: the figures to trust here)", "head_to_head"),
                       ("Single rows (the first table: one subprocess each, minutes apart under changing load)",
                        "speed")):
        if key not in checks:
            continue
        lines += ["", f"{title}:", ""]
        for batch, c in checks[key].items():
            lines.append(f"- {batch}: the fastest form within the accuracy gate is {c['best']} ({c['precision']}, "
                         f"{c['ms']:.1f} ms): {c['vs_onnxruntime_fp32']:.2f}x ONNX Runtime fp32 (goal "
                         f"{GOAL_VS_ORT_FP32}x: {'met' if c['ok_vs_onnxruntime_fp32'] else 'NOT met'}), "
                         f"{c['vs_eager_fp32']:.2f}x PyTorch eager fp32 (goal {GOAL_VS_EAGER}x: "
                         f"{'met' if c['ok_vs_eager_fp32'] else 'NOT met'})")
    h2h = result.get("head_to_head")
    if h2h:
        lines += ["", f"## Head to head: {h2h['rounds']} rounds, rotating order", "",
                  "The fp32 references and the fastest forms again, each round a fresh subprocess per form (eager "
                  "in the parent) in a rotated order, the same iterations as above; each form keeps its best round "
                  f"(1-min load {h2h['load_1min_end']} at the end). ms per batch by the best round's p50 (fastest "
                  "run), and speed-ups over ONNX Runtime fp32 and PyTorch eager fp32 by those.", "",
                  "| batch | form | ms | vs ORT fp32 | vs eager fp32 | p50 per round |",
                  "| ---: | --- | ---: | ---: | ---: | --- |"]
        for batch, forms in h2h["ms"].items():
            best = {label: {stat: min(v[stat]) for stat in ("p50", "min")} for label, v in forms.items()}
            ort, eager = best["onnxruntime fp32"], best["pytorch-eager fp32"]
            for label, b in best.items():
                lines.append(f"| {batch} | {label} | {b['p50']:.0f} ({b['min']:.0f}) | "
                             f"{ort['p50'] / b['p50']:.2f}x ({ort['min'] / b['min']:.2f}x) | "
                             f"{eager['p50'] / b['p50']:.2f}x ({eager['min'] / b['min']:.2f}x) | "
                             f"{', '.join(f'{x:.0f}' for x in forms[label]['p50'])} |")
    lines += ["", result["summary"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/runtime_cpu_512", help="world, ONNX models (not committed)")
    parser.add_argument("--train", type=int, default=128, help="train images: fit and calibration")
    parser.add_argument("--val", type=int, default=48, help="held-out val images: accuracy")
    parser.add_argument("--image-size", type=int, default=128, help="the world's image side (upscaled to 512)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration images (of train)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup-batched", type=int, default=2)
    parser.add_argument("--iters-batched", type=int, default=6)
    parser.add_argument("--name", default="runtime_cpu_512", help="results file stem under bench/results/")
    parser.add_argument("--summary", default="", help="a closing paragraph for the .md (what the numbers say)")
    parser.add_argument("--head-to-head-only", action="store_true",
                        help="add (or redo) only the interleaved head-to-head section of an existing record")
    parser.add_argument("--rounds", type=int, default=3, help="head-to-head rounds")
    parser.add_argument("--from-json", action="store_true",
                        help="recompute the ratios and checks of the .json and re-render the .md (no measuring)")
    args = parser.parse_args()
    if args.from_json or args.head_to_head_only:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        if args.head_to_head_only:
            torch.set_num_threads(args.threads)
            work = Path(args.work)
            model = fitted_segmenter(work / "world", SIZE)  # deterministic: the record's own weights
            models = {v.model: work / f"{v.model if v.model != 'fp32' else 'segmenter'}.onnx" for v in HEAD_TO_HEAD}
            result["head_to_head"] = head_to_head(SegmenterForExport(model).eval(), models, args)
        _add_ratios(result["rows"], result["floor_ms_per_image"])
        result["checks"] = _checks(result["rows"], result["accuracy"], result.get("head_to_head"))
        result["summary"] = args.summary or result["summary"]
        write_json_atomic(RESULTS / f"{args.name}.json", result)
        write_text_atomic(RESULTS / f"{args.name}.md", render(result))
        print(render(result))
        return

    import openvino

    from promptseg.runtime.backends.openvino import cpu_capabilities

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "world"
    if not data.is_dir():
        write_world(data, SynthConfig(seed=0, train=args.train, val=args.val, size=args.image_size, clip_images=0))
    print("fitting the network at 512", flush=True)
    model = fitted_segmenter(data, SIZE)
    fp32 = export_512(model, data, work / "segmenter.onnx")
    print("quantizing", flush=True)
    models = int8_models(fp32, data, work, args.calibration)

    capabilities = cpu_capabilities(openvino.Core())
    has_bf16, not_run = "BF16" in capabilities, []
    variants = [Variant("fp32", "onnxruntime"), *(Variant(m, "onnxruntime") for m in ORT_INT8),
                Variant("fp32", "openvino", "fp32")]
    if has_bf16:
        variants.append(Variant("fp32", "openvino", "bf16"))
    else:
        not_run.append(f"openvino bf16: this CPU has no bf16 units (OpenVINO CPU capabilities: "
                       f"{', '.join(capabilities)}); a bf16 request runs fp32 and says so")
    variants += [Variant(m, "openvino", "int8") for m in ("qdq-u8-all", "qdq-s8-all", *NNCF_INT8)]

    eager = SegmenterForExport(model).eval()
    x1 = torch.rand(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        _, flops = count_flops(lambda: eager(x1))
    peaks = [matmul_peak_gflops(torch.float32, seconds=3.0)]  # again at the end: the better of the two
    rows = []
    for batch in BATCHES:
        iters, warmup = (args.iters, args.warmup) if batch == 1 else (args.iters_batched, args.warmup_batched)
        for bf16 in (False, True) if cpu_has_bf16() else (False,):
            rows.append({**eager_row(eager, batch, warmup, iters, bf16), "load_1min": round(os.getloadavg()[0], 2)})
            print(f"eager {'bf16' if bf16 else 'fp32'} batch {batch}: p50 {rows[-1]['p50_ms']:.1f} ms", flush=True)
    if not cpu_has_bf16():
        not_run.append("pytorch eager bf16: no bf16 units (PyTorch would emulate it, slower than fp32)")
    rows += runtime_rows(variants, models, args)
    h2h = head_to_head(eager, models, args)
    peaks.append(matmul_peak_gflops(torch.float32, seconds=3.0))
    peak = max(peaks)
    floor_ms = flops / 1e9 / peak * 1e3
    _add_ratios(rows, floor_ms)

    accuracy = {}
    for v in variants:
        report = compare_models(CompareConfig(model_a=str(fp32), model_b=str(models[v.model]), data=str(data),
                                              split="val", limit=args.val, batch=8, backend_a="onnxruntime",
                                              backend_b=v.backend,
                                              options=BackendOptions(threads=args.threads, precision=v.precision)))
        accuracy[v.label] = {"images": report["images"], "miou_a": report["model_a"]["miou"],
                             "miou_b": report["model_b"]["miou"], "precision_b": report["model_b"]["precision"],
                             "label_agreement": report["label_agreement"],
                             "max_abs_diff": report["logits"]["max_abs_diff"]}
        print(f"accuracy {v.label}: mIoU {100 * accuracy[v.label]['miou_b']:.2f} agreement "
              f"{100 * report['label_agreement']:.2f}%", flush=True)
    checks = _checks(rows, accuracy, h2h)
    result = {"host": host_info(), "torch": torch.__version__, "threads": args.threads,
              "openvino_capabilities": list(capabilities), "cpu_bf16_units": cpu_has_bf16(),
              "load_1min_start": round(load_start, 2), "load_1min_end": round(os.getloadavg()[0], 2),
              "model": {"arch": ARCH, "input_size": SIZE, "gflop_per_image": flops / 1e9,
                        "weights": "random backbone, batch-norm statistics of the train split at 512, the two 1x1 "
                                   "classifiers fitted in closed form (ridge); not a trained network",
                        "world": {"seed": 0, "train": args.train, "val": args.val, "image_size": args.image_size},
                        "calibration_images": args.calibration},
              "peak_gflops_fp32": peak, "peak_gflops_fp32_start_end": peaks, "floor_ms_per_image": floor_ms,
              "iters": args.iters, "iters_batched": args.iters_batched, "variants": [asdict(v) for v in variants],
              "rows": rows,
              "not_run": not_run, "accuracy": accuracy, "checks": checks, "head_to_head": h2h, "summary": args.summary,
              "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", result)
    write_text_atomic(RESULTS / f"{args.name}.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
