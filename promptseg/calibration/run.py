"""``calibrate(cfg)``: calibration images -> ranges -> INT8 model(s) -> accuracy gate -> files.

Order of work: options, model metadata, the choice of images and a decode of every one of them
(cheap failures first), then the calibration pass, the quantisers (for TensorRT: the sensitivity
analysis and the repair of :mod:`.repair`), the gate and the latency runs. The model is an exported
segmenter (gate: its labels) or CAM graph (gate: pseudo-masks at the run's threshold). Files in ``cfg.out``:

- ``<stem>.<target>.onnx``: the model to deploy (INT8, or FP32 when the CPU target found no INT8
  candidate faster than FP32); written only when the gate passed, removed when it failed;
- ``calibration_cache.json``: the per-tensor ranges (min, max, amax, symmetric int8 scale) of the
  graph as shipped;
- ``calibration_report.json``: method, target, images used for what, the candidates with their
  latency and scores, FP32 vs INT8 mIoU, per-class IoU, label and foreground agreement, the
  decision; for TensorRT also the per-layer sensitivity, the repair steps with their drop and CPU
  latency, what was done to which layer, and the drop with 16, 64 and 256 calibration images;
- ``calibration_sensitivity.png`` (TensorRT): the sensitivity ranking drawn.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from .. import __version__
from ..errors import ConfigError, PromptsegError
from ..io import sha256_file, write_bytes_atomic, write_json_atomic
from ..runtime.processing import stack_batch
from ..runtime.spec import read_metadata
from .config import CalibrationConfig, Target
from .gate import Gate, Labeller, measure_latency, ort_session
from .images import ImageBatches, select_images, spread
from .openvino import OpenvinoSession, quantize_nncf
from .picture import draw_sensitivity
from .quantize import compute_ranges, name_nodes, quantisable_layers, quantization_record, quantize_cpu
from .repair import Builder, Repair
from .sensitivity import ProxyImages

SENSITIVITY_PICTURE = "calibration_sensitivity.png"
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


def _rows(built: dict[str, dict], scores: dict, latency: dict, cfg: CalibrationConfig, gate: Gate) -> list[dict]:
    """One report row per candidate: how it was built, its latency, its gate numbers."""
    rows = []
    for name, entry in built.items():
        row = {"name": name, "format": entry["format"], "activation": entry["activation"], "ops": entry["ops"],
               "backend": entry.get("backend", "onnxruntime"),
               "precision": entry.get("precision") or ("fp32" if entry["format"] == "fp32" else "int8")}
        if "error" in entry:
            rows.append({**row, "error": entry["error"], "passed": False})
            continue
        score = scores[name]
        drop = gate.drop(score)
        rows.append({**row,
                     "latency_ms": round(latency[name][cfg.latency_batch]["median"], 3),
                     "latency_ms_min": round(latency[name][cfg.latency_batch]["min"], 3),
                     "latency_ms_batch1": round(latency[name][1]["median"], 3),
                     "miou": None if score.miou is None else round(score.miou, 3),
                     "miou_vs_fp32": round(score.miou_vs_fp32, 3),
                     "label_agreement": round(score.label_agreement, 6),
                     "foreground_agreement": round(score.foreground_agreement, 6),
                     "miou_drop": round(drop, 3),
                     "passed": gate.passes(score)})
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
        reason = "no INT8 candidate stays" if cfg.target is Target.CPU else "the INT8 model does not stay"
        best = min((r["miou_drop"] for r in int8_rows), default=float("nan"))
        note = f"{reason} within {cfg.max_drop} mIoU points of FP32 (best drop {best:.2f}); no model written"
    for r in rows:
        r["chosen"] = r["name"] == chosen
    return chosen, best_int8, note


def labeller_for(cfg: CalibrationConfig, meta) -> tuple[Labeller, tuple[str, ...]]:
    """How the gate reads the graph's outputs, and its classes (background first)."""
    if meta.kind == "segmenter":
        return Labeller("segmenter"), tuple(meta.class_names)
    if meta.kind != "cam":
        raise ConfigError(f"{cfg.model}: a {meta.kind!r} graph | expected a segmenter or a CAM graph")
    threshold = cfg.cam_threshold
    if threshold is None and "cam_threshold" in meta.extra:
        threshold = float(meta.extra["cam_threshold"])
    if threshold is None:
        raise ConfigError(f"cam_threshold: {cfg.model} records none | expected --cam-threshold T (the CAM run's "
                          f"background_threshold in its report.json)")
    return Labeller("cam", threshold), ("background", *meta.class_names)


def _check_keep_float(cfg: CalibrationConfig, fp32: onnx.ModelProto) -> None:
    layers = quantisable_layers(fp32)
    unknown = [name for name in cfg.keep_float if name not in layers]
    if unknown:
        raise ConfigError(f"keep_float: got {unknown} | expected names of quantised layers of {cfg.model}, e.g. "
                          f"{', '.join(layers[:4])}")


def _proxy_images(calib: ImageBatches, count: int) -> tuple[np.ndarray, list]:
    """Up to ``count`` calibration images spread over the list, of one size (the first batch), and
    their image-level labels."""
    refs = [calib.refs[i] for i in spread(min(count, len(calib.refs)), len(calib.refs))]
    subset = ImageBatches(refs, count, calib.max_side, calib.input_name).check()
    indices = subset.groups()[0]
    return stack_batch([subset.load(i) for i in indices]), [refs[i].image_labels for i in indices]


def calibrate(cfg: CalibrationConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one calibration; return the report. Raises :class:`CalibrationGateError` after writing the
    report when no INT8 model stays within ``cfg.max_drop`` mIoU points of FP32."""
    import onnxruntime

    say = log or (lambda message: None)
    started = time.perf_counter()
    cfg.validate()
    meta = read_metadata(cfg.model)
    labeller, class_names = labeller_for(cfg, meta)
    input_name = meta.graph.input_names[0]
    fp32 = name_nodes(onnx.load(cfg.model))
    _check_keep_float(cfg, fp32)

    say("choosing and checking images")
    selection = select_images(data=cfg.data, images=cfg.images, split=cfg.split, gate_split=cfg.gate_split,
                              num=cfg.num, gate_num=cfg.gate_num, class_names=class_names[1:])
    calib = ImageBatches(selection.calibration, cfg.batch, cfg.max_side, input_name).check()
    gate_images = ImageBatches(selection.gate, cfg.batch, cfg.max_side, input_name).check(
        masks=selection.gate_has_masks)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target_file = out / output_name(cfg.model, cfg.target)
    model_sha = sha256_file(cfg.model)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="promptseg-calibrate-") as tmp_name:
        tmp = Path(tmp_name)
        fp32_path = tmp / "fp32.onnx"  # a copy: ONNX Runtime writes helper files beside its input
        onnx.save(fp32, str(fp32_path))
        say(f"accuracy gate: FP32 on {len(gate_images.refs)} held-out images")
        tensorrt = cfg.target is Target.TENSORRT  # the gate emulates TensorRT's arithmetic, not ORT's int8 kernels
        gate = Gate(gate_images, ort_session(fp32_path, cfg.threads), labeller, class_names, max_drop=cfg.max_drop,
                    min_foreground_agreement=cfg.min_foreground_agreement, input_name=input_name,
                    threads=cfg.threads, int8_kernels=not tensorrt)
        record = {"method": cfg.method.value, "fp32_sha256": model_sha}
        repair_report: dict = {}
        say(f"calibrating ({cfg.method.value}) on {len(calib.refs)} images in {len(calib)} batches")
        t = time.perf_counter()
        if cfg.target is Target.TENSORRT:
            builder = Builder(fp32, cfg, tmp, {"target": "tensorrt", "format": "qdq", "activation": "s8",
                                               "weights": "s8 per-channel", **record})
            ranges = builder.source(calib, False)[2]
            timings["calibration_s"] = time.perf_counter() - t
            t = time.perf_counter()
            say("quantising for TensorRT (symmetric int8 QDQ), gate and sensitivity")
            batch, image_labels = _proxy_images(calib, cfg.proxy_images)
            proxy = ProxyImages.from_fp32(fp32_path, batch, image_labels, labeller, input_name, cfg.threads)
            repair = Repair(builder, gate, calib, proxy, cfg, say, input_name)
            repair_report = repair.run()
            final = repair_report.pop("final")
            repair_report["calibration_images"] = repair.image_counts(final)
            ranges = final.built.ranges
            qdq_summary = final.built.qdq
            built: dict[str, dict] = {
                "fp32": {"model": fp32_path, "format": "fp32", "activation": None, "ops": None},
                TENSORRT_CANDIDATE: {"model": final.built.model, "format": "qdq", "activation": "s8",
                                     "ops": "tensorrt"}}
            # the kept steps' graphs, timed beside the shipped one (the last kept step) for their CPU cost
            chain = {f"step:{s.name}": s.built.model for s in repair.steps if s.kept and s is not final}
            known = {TENSORRT_CANDIDATE: final.score}
            timings["repair_s"] = time.perf_counter() - t
        else:
            ranges = compute_ranges(fp32_path, calib, cfg.method, cfg.percentile, False, tmp)
            timings["calibration_s"] = time.perf_counter() - t
            t = time.perf_counter()
            built = _cpu_candidates(cfg, fp32_path, ranges, calib, tmp, record, say)
            qdq_summary, chain, known = None, {}, {}
            timings["quantization_s"] = time.perf_counter() - t

        sessions = {}
        for name, entry in built.items():
            if entry.get("backend") == "openvino" and "error" not in entry:
                try:  # bf16 where the CPU has no bf16 units is a row that says so, not a second fp32 timing
                    sessions[name] = OpenvinoSession(entry["model"], cfg.threads, entry["precision"])
                    entry["precision"] = sessions[name].runner.precision  # what the compiled model runs
                except PromptsegError as exc:
                    entry["error"] = str(exc)
            elif "error" not in entry:
                sessions[name] = ort_session(entry["model"], cfg.threads)
        runnable = {name: e for name, e in built.items() if "error" not in e}
        t = time.perf_counter()
        # OpenVINO candidates are scored as OpenVINO runs them; ONNX Runtime ones by the gate's own session
        scores = {name: gate.reference if name == "fp32" else known.get(name) or gate.score(
            sessions[name] if e.get("backend") == "openvino" else e["model"]) for name, e in runnable.items()}
        timings["gate_s"] = time.perf_counter() - t

        say(f"latency: 2 blocks of {cfg.latency_runs} runs per model, {cfg.threads} threads")
        t = time.perf_counter()
        inputs = _latency_inputs(gate_images, meta.input_size, cfg.latency_batch)
        load_before = os.getloadavg()[0]
        timed = {**sessions, **{name: ort_session(m, cfg.threads) for name, m in chain.items()}}
        latency = measure_latency(timed, inputs, cfg.latency_runs, input_name=input_name)
        load_after = os.getloadavg()[0]
        timings["latency_s"] = time.perf_counter() - t

        openvino_version = next((s.version for s in sessions.values() if isinstance(s, OpenvinoSession)), None)
        rows = _rows(built, scores, latency, cfg, gate)
        chosen, best_int8, note = _decide(rows, cfg)
        passed = chosen is not None
        chosen_row = next((r for r in rows if r["name"] == chosen), None)
        if chosen_row is not None and chosen_row["backend"] == "openvino":
            note += (f"; run {target_file.name} with --backend openvino"
                     + (f" --precision {chosen_row['precision']}" if chosen_row["precision"] == "bf16" else ""))
        if repair_report:
            repair_report["steps"] = _step_rows(repair.steps, final, latency, cfg, gate)
            note = _repair_note(repair_report, note, cfg.repair)
        report = {
            "kind": meta.kind,
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
            "gate_metric": gate.metric(),
            "int8_candidate": None if best_int8 is None else best_int8["name"],
            "miou_fp32": None if gate.reference.miou is None else round(gate.reference.miou, 3),
            "miou_int8": None if best_int8 is None else best_int8.get("miou"),
            "miou_drop": None if best_int8 is None else best_int8.get("miou_drop"),
            "label_agreement": None if best_int8 is None else best_int8.get("label_agreement"),
            "foreground_agreement": None if best_int8 is None else best_int8.get("foreground_agreement"),
            "per_class_iou": {"basis": "ground truth" if gate.with_gt else "FP32 labels as the target",
                              "fp32": gate.reference.per_class_iou,
                              "int8": None if best_int8 is None else scores[best_int8["name"]].per_class_iou},
            "candidates": rows,
            **({"repair": repair_report} if repair_report else {}),
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
            "gate_runtime": ("onnxruntime CPU running the QDQ graph in float between Q/DQ pairs (basic graph "
                             "optimisations, no fusion into ONNX Runtime's int8 kernels): TensorRT's arithmetic up to "
                             "rounding; re-check the engine on the device"
                             if cfg.target is Target.TENSORRT else "onnxruntime CPU, the candidates as they are"),
            "calibration": {**selection.calibration_source, "used": len(selection.calibration),
                            "batches": ranges.num_batches, "ids": calib.ids},
            "gate": {**selection.gate_source, "used": len(selection.gate), "ground_truth": gate.with_gt,
                     "ids": gate_images.ids},
            "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}",
            "promptseg_version": __version__,
            "seconds": {**{k: round(v, 2) for k, v in timings.items()},
                        "total_s": round(time.perf_counter() - started, 2)},
        }
        write_json_atomic(out / "calibration_cache.json", {
            "format": "promptseg calibration cache 1: per-tensor float ranges; int8_scale = amax / 127",
            "model": str(cfg.model), "model_sha256": model_sha, "method": cfg.method.value,
            "percentile": cfg.percentile if cfg.method.value == "percentile" else None,
            "num_images": ranges.num_images,
            **({"of": "the graph as shipped: equalised weights and per-tensor methods as in "
                      "calibration_report.json repair.repairs", "recipe": final.recipe.record()}
               if cfg.target is Target.TENSORRT else {}),
            "tensors": ranges.table()})
        if repair_report:
            marks = {r["layer"]: r["action"] for r in repair_report["repairs"] if "layer" in r}
            draw_sensitivity(repair_report["sensitivity"], marks, out / SENSITIVITY_PICTURE,
                             f"{Path(cfg.model).name}: per-layer INT8 sensitivity ({meta.kind})")
        if passed:
            entry = built[chosen]
            data = Path(cfg.model).read_bytes() if chosen == "fp32" else _bytes(entry["model"])
            write_bytes_atomic(target_file, data)
        elif target_file.exists():
            target_file.unlink()  # a model from an earlier run must not sit beside a failed report
        write_json_atomic(out / "calibration_report.json", report)
    if not passed:
        raise CalibrationGateError(f"accuracy gate failed: {note} (see {out / 'calibration_report.json'})", report)
    return report


def _bytes(model) -> bytes:
    return model.SerializeToString() if hasattr(model, "SerializeToString") else Path(model).read_bytes()


def _cpu_candidates(cfg: CalibrationConfig, fp32_path: Path, ranges, calib: ImageBatches, tmp: Path, record: dict,
                    say) -> dict[str, dict]:
    """Every CPU candidate: ONNX Runtime's forms built from the one set of ranges, and with the openvino
    extra OpenVINO's (the FP32 graph, the QDQ graphs, NNCF's own int8 from the same images). One a
    quantizer cannot build is a row with its error."""
    ort_cache = ranges.save_ort(tmp / "ort_calibration_cache.json")
    built: dict[str, dict] = {"fp32": {"model": fp32_path, "format": "fp32", "activation": None, "ops": None}}
    for candidate in cfg.candidates:
        if candidate.is_reference:
            continue
        say(f"preparing CPU candidate {candidate.name}")
        path = fp32_path if candidate.is_fp32 else tmp / f"{candidate.name}.onnx"
        extra = {"precision": "int8", "quantization": quantization_record(
            target="cpu", format=candidate.format, activation=candidate.activation, ops=candidate.ops,
            weights="s8 per-channel", backend=candidate.backend, num_images=ranges.num_images,
            keep_float=list(cfg.keep_float), **record)}
        entry = {"model": path, "format": candidate.format, "activation": candidate.activation, "ops": candidate.ops,
                 "backend": candidate.backend, "precision": candidate.precision}
        try:
            if candidate.format == "nncf":
                quantize_nncf(fp32_path, path, calib, candidate.activation, extra)
            elif not candidate.is_fp32:
                quantize_cpu(candidate, fp32_path, path, ort_cache, ranges, extra, cfg.keep_float)
        except Exception as exc:  # a form a quantizer cannot build is a row of the table, not the end
            entry["error"] = f"{type(exc).__name__}: {exc}"
        built[candidate.name] = entry
    return built


def _step_rows(steps, final, latency: dict, cfg: CalibrationConfig, gate: Gate) -> list[dict]:
    """The repair's steps for the report, each with its CPU latency (kept steps) and its cost over plain."""
    def timing(step):
        return latency[TENSORRT_CANDIDATE] if step is final else latency.get(f"step:{step.name}")

    plain_ms = timing(steps[0])[cfg.latency_batch]["median"]
    rows = []
    for step in steps:
        row = step.row(gate)
        timing_ms = timing(step) if step.kept else None
        if timing_ms is not None:
            ms = timing_ms[cfg.latency_batch]["median"]
            row.update(latency_ms=round(ms, 3), latency_cost_ms=round(ms - plain_ms, 3))
        rows.append(row)
    return rows


def _repair_note(repair: dict, note: str, repaired: bool) -> str:
    """One line for the user: which layer breaks INT8 (or is the most sensitive), and what was done about it."""
    culprit = repair["culprit"]
    if culprit is None:
        return note
    gate = culprit["gate"] or {}
    plain = repair["steps"][0]
    what = (f"{'most sensitive layer' if plain['passed'] else 'the layer that breaks INT8'}: {culprit['layer']} "
            f"({culprit['op']} reading {', '.join(culprit['activations']) or 'weights only'}"
            + (f"; quantised alone it costs {gate['only_quantised_drop']:.2f}" if gate else "") + ")")
    done = [f"{r.get('layer', r.get('tensor'))}: {r['action']}" for r in repair["repairs"]]
    if done:
        outcome = f"repairs: {'; '.join(done[:6])}"
    elif plain["passed"]:
        outcome = "every layer INT8"
    else:
        outcome = "no repair tried (--no-repair)" if not repaired else "no repair found"
    return "; ".join(part for part in (note, what, outcome) if part)
