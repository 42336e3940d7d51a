"""``calibrate(cfg)``: calibration images -> ranges -> INT8 model(s) -> accuracy gate -> files.

Order of work: options, model metadata, the choice of images and a decode of every one of them
(cheap failures first), then the calibration pass, the quantisers, the gate and the latency runs.
Files in ``cfg.out``:

- ``<stem>.<target>.onnx``: the model to deploy (INT8, or FP32 when the CPU target found no INT8
  candidate faster than FP32); written only when the gate passed, removed when it failed;
- ``calibration_cache.json``: the per-tensor ranges (min, max, amax, symmetric int8 scale);
- ``calibration_report.json``: method, target, images used for what, the candidates with their
  latency and scores, FP32 vs INT8 mIoU and label agreement, and the decision.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import ConfigError, PromptsegError
from ..io import sha256_file, write_bytes_atomic, write_json_atomic
from ..runtime.processing import stack_batch
from ..runtime.spec import read_metadata
from .config import CalibrationConfig, Target
from .gate import evaluate, measure_latency, ort_session
from .images import ImageBatches, select_images
from .openvino import OpenvinoSession, quantize_nncf
from .quantize import compute_ranges, quantization_record, quantize_cpu, quantize_tensorrt

TENSORRT_CANDIDATE = "tensorrt-qdq-s8"


class CalibrationGateError(PromptsegError):
    """INT8 lost more mIoU than allowed; ``report`` holds the numbers (also in calibration_report.json)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def output_name(model: str | Path, target: Target) -> str:
    return f"{Path(model).stem}.{target.value}.onnx"


def _latency_inputs(gate: ImageBatches, size_hw: tuple[int, int], batch: int) -> dict[int, np.ndarray]:
    """Real gate images resized to the network's input size, at batch 1 and ``batch``."""
    count = min(batch, len(gate.refs))
    images = [np.asarray(Image.fromarray(gate.load(i)).resize((size_hw[1], size_hw[0]), Image.BILINEAR))
              for i in range(count)]
    x = stack_batch(images)
    if len(x) < batch:  # fewer gate images than the batch: repeat them
        x = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    return {1: np.ascontiguousarray(x[:1]), batch: x} if batch > 1 else {1: x}


def _rows(built: dict[str, dict], scores: dict, latency: dict, cfg: CalibrationConfig, with_gt: bool) -> list[dict]:
    """One report row per candidate: how it was built, its latency, its gate numbers."""
    fp32 = scores["fp32"]
    rows = []
    for name, entry in built.items():
        row = {"name": name, "format": entry["format"], "activation": entry["activation"], "ops": entry["ops"],
               "backend": entry.get("backend", "onnxruntime"),
               "precision": entry.get("precision") or ("fp32" if entry["format"] == "fp32" else "int8")}
        if "error" in entry:
            rows.append({**row, "error": entry["error"], "passed": False})
            continue
        score = scores[name]
        drop = (fp32.miou - score.miou) if with_gt else 100.0 * (1.0 - score.label_agreement)
        rows.append({**row,
                     "latency_ms": round(latency[name][cfg.latency_batch]["median"], 3),
                     "latency_ms_min": round(latency[name][cfg.latency_batch]["min"], 3),
                     "latency_ms_batch1": round(latency[name][1]["median"], 3),
                     "miou": None if score.miou is None else round(score.miou, 3),
                     "miou_vs_fp32": round(score.miou_vs_fp32, 3),
                     "label_agreement": round(score.label_agreement, 6),
                     "miou_drop": round(drop, 3),
                     "passed": bool(drop <= cfg.max_drop)})
    return rows


def _decide(rows: list[dict], cfg: CalibrationConfig) -> tuple[str | None, dict | None, str]:
    """``(chosen name or None when the gate failed, the INT8 row the report quotes, a note)``; marks rows.

    TensorRT: its one INT8 model, if it passed. CPU: the fastest INT8 candidate that passed, unless
    it is not ``min_speedup`` times faster than FP32, in which case FP32 stays (and the note says so).
    """
    by_name = {r["name"]: r for r in rows}
    int8_rows = [r for r in rows if r["name"] != "fp32" and "error" not in r]
    int8_passed = [r for r in int8_rows if r["passed"]]
    chosen, note = None, ""
    if cfg.target is Target.TENSORRT:
        best_int8 = by_name.get(TENSORRT_CANDIDATE)
        chosen = TENSORRT_CANDIDATE if int8_passed else None
    else:
        # the fastest that passed; when none did, the closest to passing
        best_int8 = min(int8_passed, key=lambda r: r["latency_ms"]) if int8_passed else \
            min(int8_rows, key=lambda r: r["miou_drop"], default=None)
        if int8_passed:
            fp32_ms = by_name["fp32"]["latency_ms"]
            if best_int8["latency_ms"] * cfg.min_speedup <= fp32_ms:
                chosen = best_int8["name"]
                note = (f"{chosen} is {fp32_ms / best_int8['latency_ms']:.2f}x faster than FP32 on this CPU "
                        f"and within {cfg.max_drop} mIoU points")
            else:
                chosen = "fp32"
                note = (f"INT8 cannot beat FP32 on this CPU: the fastest candidate that passed the gate "
                        f"({best_int8['name']}: {best_int8['precision']} on {best_int8['backend']}, "
                        f"{best_int8['latency_ms']:.3f} ms/image) is not "
                        f"{cfg.min_speedup}x faster than FP32 ({fp32_ms:.3f} ms/image); keeping FP32")
    if chosen is None:
        reason = "no INT8 candidate" if cfg.target is Target.CPU else "the INT8 model"
        best = min((r["miou_drop"] for r in int8_rows), default=float("nan"))
        note = f"{reason} stays within {cfg.max_drop} mIoU points of FP32 (best drop {best:.2f}); no model written"
    for r in rows:
        r["chosen"] = r["name"] == chosen
    return chosen, best_int8, note


def calibrate(cfg: CalibrationConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one calibration; return the report. Raises :class:`CalibrationGateError` after writing the
    report when no INT8 model stays within ``cfg.max_drop`` mIoU points of FP32."""
    import onnxruntime

    say = log or (lambda message: None)
    started = time.perf_counter()
    cfg.validate()
    meta = read_metadata(cfg.model)
    if meta.kind != "segmenter":
        raise ConfigError(f"{cfg.model}: a {meta.kind!r} graph | expected a segmenter (the gate scores its labels)")
    spec = meta.graph
    input_name, labels_name = spec.input_names[0], "labels"
    num_classes = len(meta.class_names)

    say("choosing and checking images")
    selection = select_images(data=cfg.data, images=cfg.images, split=cfg.split, gate_split=cfg.gate_split,
                              num=cfg.num, gate_num=cfg.gate_num, class_names=meta.class_names[1:])
    calib = ImageBatches(selection.calibration, cfg.batch, cfg.max_side, input_name).check()
    gate = ImageBatches(selection.gate, cfg.batch, cfg.max_side, input_name).check(masks=selection.gate_has_masks)
    with_gt = selection.gate_has_masks

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target_file = out / output_name(cfg.model, cfg.target)
    model_sha = sha256_file(cfg.model)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="promptseg-calibrate-") as tmp_name:
        tmp = Path(tmp_name)
        fp32_path = tmp / "fp32.onnx"  # a copy: ONNX Runtime writes helper files beside its input
        shutil.copyfile(cfg.model, fp32_path)

        say(f"calibrating ({cfg.method.value}) on {len(calib.refs)} images in {len(calib)} batches")
        t = time.perf_counter()
        ranges = compute_ranges(fp32_path, calib, cfg.method, cfg.percentile, cfg.target is Target.TENSORRT, tmp)
        ort_cache = ranges.save_ort(tmp / "ort_calibration_cache.json")
        write_json_atomic(out / "calibration_cache.json", {
            "format": "promptseg calibration cache 1: per-tensor float ranges; int8_scale = amax / 127",
            "model": str(cfg.model), "model_sha256": model_sha, "method": cfg.method.value,
            "percentile": cfg.percentile if cfg.method.value == "percentile" else None,
            "num_images": ranges.num_images, "tensors": ranges.table()})
        timings["calibration_s"] = time.perf_counter() - t

        t = time.perf_counter()
        built: dict[str, dict] = {"fp32": {"path": fp32_path, "format": "fp32", "activation": None, "ops": None}}
        record = {"method": cfg.method.value, "num_images": ranges.num_images, "fp32_sha256": model_sha}
        qdq_summary = None
        if cfg.target is Target.TENSORRT:
            say("quantising for TensorRT (symmetric int8 QDQ)")
            path = tmp / f"{TENSORRT_CANDIDATE}.onnx"
            extra = {"precision": "int8", "quantization": quantization_record(
                target="tensorrt", format="qdq", activation="s8", weights="s8 per-channel", **record)}
            _, qdq_summary = quantize_tensorrt(fp32_path, path, ort_cache, ranges, extra)
            built[TENSORRT_CANDIDATE] = {"path": path, "format": "qdq", "activation": "s8", "ops": "tensorrt"}
        else:
            for candidate in cfg.candidates:
                if candidate.is_reference:
                    continue
                say(f"preparing CPU candidate {candidate.name}")
                path = fp32_path if candidate.is_fp32 else tmp / f"{candidate.name}.onnx"
                extra = {"precision": "int8", "quantization": quantization_record(
                    target="cpu", format=candidate.format, activation=candidate.activation, ops=candidate.ops,
                    weights="s8 per-channel", backend=candidate.backend, **record)}
                entry = {"path": path, "format": candidate.format, "activation": candidate.activation,
                         "ops": candidate.ops, "backend": candidate.backend, "precision": candidate.precision}
                try:
                    if candidate.format == "nncf":
                        quantize_nncf(fp32_path, path, calib, candidate.activation, extra)
                    elif not candidate.is_fp32:
                        quantize_cpu(candidate, fp32_path, path, ort_cache, ranges, extra)
                except Exception as exc:  # a form a quantizer cannot build is a row of the table, not the end
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                built[candidate.name] = entry
        timings["quantization_s"] = time.perf_counter() - t

        sessions = {}
        for name, entry in built.items():
            if entry.get("backend") == "openvino" and "error" not in entry:
                try:  # bf16 where the CPU has no bf16 units is a row that says so, not a second fp32 timing
                    sessions[name] = OpenvinoSession(entry["path"], cfg.threads, entry["precision"])
                    entry["precision"] = sessions[name].runner.precision  # what the compiled model runs
                except PromptsegError as exc:
                    entry["error"] = str(exc)
            elif "error" not in entry:
                sessions[name] = ort_session(entry["path"], cfg.threads)
        say(f"accuracy gate on {len(gate.refs)} held-out images ({len(sessions)} models)")
        t = time.perf_counter()
        scores = evaluate(sessions, gate, num_classes, input_name=input_name, labels_name=labels_name)
        timings["gate_s"] = time.perf_counter() - t

        say(f"latency: 2 blocks of {cfg.latency_runs} runs per model, {cfg.threads} threads")
        t = time.perf_counter()
        inputs = _latency_inputs(gate, meta.input_size, cfg.latency_batch)
        load_before = os.getloadavg()[0]
        latency = measure_latency(sessions, inputs, cfg.latency_runs, input_name=input_name)
        load_after = os.getloadavg()[0]
        timings["latency_s"] = time.perf_counter() - t

        openvino_version = next((s.version for s in sessions.values() if isinstance(s, OpenvinoSession)), None)
        rows = _rows(built, scores, latency, cfg, with_gt)
        chosen, best_int8, note = _decide(rows, cfg)
        passed = chosen is not None
        chosen_row = next((r for r in rows if r["name"] == chosen), None)
        if chosen_row is not None and chosen_row["backend"] == "openvino":
            note += (f"; run {target_file.name} with --backend openvino"
                     + (f" --precision {chosen_row['precision']}" if chosen_row["precision"] == "bf16" else ""))

        report = {
            "method": cfg.method.value,
            "percentile": cfg.percentile if cfg.method.value == "percentile" else None,
            "target": cfg.target.value,
            "num_images": ranges.num_images,
            "model": str(cfg.model),
            "model_sha256": model_sha,
            "output": target_file.name if passed else None,
            "chosen": chosen,
            "precision": None if chosen_row is None else chosen_row["precision"],
            "backend": None if chosen_row is None else chosen_row["backend"],
            "gate_passed": passed,
            "note": note,
            "max_drop": cfg.max_drop,
            "gate_metric": ("mIoU against the ground-truth masks of held-out images (points); drop = FP32 - INT8"
                            if with_gt else
                            "no ground truth: drop = share of held-out pixels whose INT8 label differs from the FP32 "
                            "label, in percentage points (an estimate of the loss, not a measured mIoU: miou_fp32 "
                            "and miou_int8 are null; miou_vs_fp32 per candidate is the mIoU of the INT8 labels "
                            "taking the FP32 labels as the target)"),
            "int8_candidate": None if best_int8 is None else best_int8["name"],
            "miou_fp32": None if scores["fp32"].miou is None else round(scores["fp32"].miou, 3),
            "miou_int8": None if best_int8 is None else best_int8.get("miou"),
            "miou_drop": None if best_int8 is None else best_int8.get("miou_drop"),
            "label_agreement": None if best_int8 is None else best_int8.get("label_agreement"),
            "candidates": rows,
            "latency": {"unit": "ms per image: latency_ms median (the choice), latency_ms_min fastest run, "
                                "latency_ms_batch1 median at batch 1", "batch": cfg.latency_batch,
                        "input_size": list(meta.input_size), "threads": cfg.threads, "runs": cfg.latency_runs,
                        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
                                   + (f"; openvino {openvino_version} CPU plugin" if openvino_version else ""),
                        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                        "cpu_count": os.cpu_count(), "load_average_1min": [round(load_before, 2),
                                                                           round(load_after, 2)],
                        **({"note": "ONNX Runtime CPU timings of the QDQ graph; TensorRT's are measured on the "
                                    "device"} if cfg.target is Target.TENSORRT else {})},
            "qdq": qdq_summary,
            "gate_runtime": ("onnxruntime CPU running the QDQ graph (float math between Q/DQ pairs); TensorRT's INT8 "
                             "kernels round differently, so re-check the engine on the device"
                             if cfg.target is Target.TENSORRT else "onnxruntime CPU, the candidates as they are"),
            "calibration": {**selection.calibration_source, "used": len(selection.calibration),
                            "batches": ranges.num_batches, "ids": calib.ids},
            "gate": {**selection.gate_source, "used": len(selection.gate), "ground_truth": with_gt,
                     "ids": gate.ids},
            "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}",
            "promptseg_version": __version__,
            "seconds": {**{k: round(v, 2) for k, v in timings.items()},
                        "total_s": round(time.perf_counter() - started, 2)},
        }
        if passed:
            write_bytes_atomic(target_file, Path(built[chosen]["path"]).read_bytes())
        elif target_file.exists():
            target_file.unlink()  # a model from an earlier run must not sit beside a failed report
        write_json_atomic(out / "calibration_report.json", report)
    if not passed:
        raise CalibrationGateError(f"accuracy gate failed: {note} (see {out / 'calibration_report.json'})", report)
    return report
