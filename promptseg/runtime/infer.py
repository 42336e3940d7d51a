"""``promptseg infer``: palette-PNG masks (and overlays) for image files, on any backend.

A file that cannot be used (unreadable, truncated, too many pixels, an impossible aspect ratio) is
reported by name with the reason in ``summary.json`` and the others are still processed; the
caller turns "some failed" into the exit code. Images run at their native size (the graph resizes
inside), downscaled to ``max_side`` or upscaled to ``MIN_SIDE`` first; masks come back at the
original size. Files are decoded a few batches ahead, so memory stays bounded for any count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np
from PIL import Image

from ..data.images import load_rgb
from ..errors import DataError, PromptsegError
from ..io import atomic_write, write_json_atomic
from .backends import BACKENDS, BackendOptions, open_runner
from .processing import fit_sides, group_by_size, labels_to_png, overlay, resize_labels, stack_batch
from .spec import MAX_SIDE, MIN_SIDE

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pnm"})
DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB of RGB: the most a Jetson should take
READ_AHEAD_BATCHES = 8


@dataclass(frozen=True)
class InferConfig:
    model: str
    inputs: tuple[str, ...]
    out: str
    backend: str = "onnxruntime"
    batch: int = 1
    overlay: bool = False
    max_side: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    options: BackendOptions = field(default_factory=BackendOptions)

    def validate(self) -> InferConfig:
        if not self.inputs:
            raise PromptsegError("inputs: got none | expected image files or folders")
        if self.backend not in BACKENDS:
            raise PromptsegError(f"backend: got {self.backend!r} | expected one of {', '.join(BACKENDS)}")
        if self.batch < 1:
            raise PromptsegError(f"batch: got {self.batch} | expected >= 1")
        if not MIN_SIDE <= self.max_side <= MAX_SIDE:
            raise PromptsegError(f"max_side: got {self.max_side} | expected {MIN_SIDE}..{MAX_SIDE}")
        if self.max_pixels < 1:
            raise PromptsegError(f"max_pixels: got {self.max_pixels} | expected >= 1")
        self.options.validate()
        return self


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given (whatever their suffix) and the image files of folders (sorted, not recursive);
    duplicates dropped. A missing file is kept: it is reported with the others."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PromptsegError(f"{path}: no image files | expected {', '.join(sorted(IMAGE_SUFFIXES))}")
            files.extend(found)
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output stem per input: the file's stem, made unique when two inputs share it."""
    counts = Counter(p.stem for p in paths)
    names, used = [], set()
    for path in paths:
        base = path.stem if counts[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names.append(name)
    return names


def load_input(path: Path, max_pixels: int) -> np.ndarray:
    """``H x W x 3`` uint8 RGB, or :class:`DataError` naming the file: the pixel count is checked from
    the header before decoding, and Pillow's decompression-bomb refusal becomes a reason too."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError):
        width = height = 0  # not readable at all: load_rgb below names the reason
    if width * height > max_pixels:
        raise DataError(f"{path}: {width}x{height} (WxH) is {width * height} pixels | expected at most "
                        f"{max_pixels} (--max-pixels)")
    return load_rgb(path)


def _write_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def _prepare(paths: Sequence[Path], chunk: range, cfg: InferConfig,
             records: list[dict]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Decoded originals and model-sized inputs by index; a file that fails gets its reason instead."""
    originals, inputs = {}, {}
    for i in chunk:
        try:
            original = load_input(paths[i], cfg.max_pixels)
        except DataError as exc:
            records[i]["reason"] = str(exc)
            continue
        try:
            inputs[i] = fit_sides(original, MIN_SIDE, cfg.max_side)
        except PromptsegError as exc:
            records[i]["reason"] = f"{paths[i]}: {exc}"
            continue
        originals[i] = original
    return originals, inputs


def _write_outputs(out: Path, name: str, original: np.ndarray, model_input: np.ndarray, labels: np.ndarray,
                   meta, with_overlay: bool) -> dict:
    """The mask (and overlay) of one image at its original size; returns its summary record."""
    labels = resize_labels(labels, original.shape[:2])
    mask_path = out / "masks" / f"{name}.png"
    _write_png(mask_path, labels_to_png(labels, meta.palette))
    record = {"ok": True, "mask": str(mask_path), "size_wh": [original.shape[1], original.shape[0]],
              "model_size_wh": [model_input.shape[1], model_input.shape[0]],
              "classes": [meta.class_names[c] for c in np.unique(labels).tolist()]}
    if with_overlay:
        overlay_path = out / "overlays" / f"{name}.png"
        _write_png(overlay_path, Image.fromarray(overlay(original, labels, meta.palette)))
        record["overlay"] = str(overlay_path)
    return record


def run_infer(cfg: InferConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Masks into ``out/masks``, overlays into ``out/overlays``, ``out/summary.json``; returns the summary.

    ``summary["failed"]`` counts the files that got no mask, each with its ``reason``.
    """
    cfg.validate()
    paths = collect_inputs(cfg.inputs)
    out = Path(cfg.out)
    names = output_names(paths)
    records: list[dict] = [{"file": str(p), "ok": False} for p in paths]
    options = replace(cfg.options, max_batch=max(cfg.options.max_batch, cfg.batch), max_side=cfg.max_side)
    started, infer_seconds = perf_counter(), 0.0
    with open_runner(cfg.model, cfg.backend, options) as runner:
        meta = runner.metadata
        if meta.kind != "segmenter":
            raise PromptsegError(f"{cfg.model}: a {meta.kind} model | expected a segmenter (logits, labels)")
        step = cfg.batch * READ_AHEAD_BATCHES
        for start in range(0, len(paths), step):
            chunk = range(start, min(start + step, len(paths)))
            originals, inputs = _prepare(paths, chunk, cfg, records)
            order = list(inputs)
            for group in group_by_size([inputs[i].shape[:2] for i in order], cfg.batch):
                ids = [order[g] for g in group]
                tick = perf_counter()
                try:
                    outputs = runner.infer({"image": stack_batch([inputs[i] for i in ids])})
                except PromptsegError as exc:  # this batch fails (named per file); the others still run
                    for i in ids:
                        records[i]["reason"] = f"{paths[i]}: {exc}"
                    continue
                infer_seconds += perf_counter() - tick
                for k, i in enumerate(ids):
                    records[i].update(_write_outputs(out, names[i], originals[i], inputs[i], outputs["labels"][k],
                                                     meta, cfg.overlay))
            if progress is not None:
                progress(len(chunk))
        precision, precision_note = runner.precision, runner.precision_note
    failed = sum(not r["ok"] for r in records)
    summary = {"model": str(cfg.model), "backend": cfg.backend, "precision": precision,
               "precision_note": precision_note, "images": len(paths), "succeeded": len(paths) - failed,
               "failed": failed,
               "seconds": round(perf_counter() - started, 4), "inference_seconds": round(infer_seconds, 4),
               "files": records}
    write_json_atomic(out / "summary.json", summary)
    return summary
