"""``promptseg export RUN_DIR``: from a demo/pipeline run folder to the files a device needs.

Writes ``segmenter.onnx`` (from ``RUN_DIR/seg_<method>``), ``cam.onnx`` (from ``RUN_DIR/<method>``),
``text_features.npy``, ``manifest.json`` (files with sha256, versions, the run's configs) and
``export_report.json`` (parity per file). A failed parity gate raises after the report is written.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.palette import voc_palette
from ..data.voc import VOCDataset
from ..errors import ConfigError, PromptsegError
from ..io import read_json, sha256_file, write_json_atomic, write_npy_atomic
from ..runtime.processing import group_by_size
from ..runtime.spec import CAM, SEGMENTER, ModelMetadata
from .onnx_export import OPSET, export_onnx
from .parity import ParityBounds, ParityError, check_parity
from .text import fold_text_features
from .wrappers import CamForExport, SegmenterForExport

METHODS = ("baseline", "clims", "pole", "semples")


@dataclass(frozen=True)
class ExportConfig:
    run: str  # a `promptseg demo` / `pipeline` run folder
    out: str
    method: str = "semples"  # whose CAM network and pseudo-mask segmenter to export
    parity_split: str = "val"
    parity_images: int = 64
    max_abs_diff: float = 1e-3
    min_label_agreement: float = 0.999

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: got {self.method!r} | expected one of {', '.join(METHODS)}")
        if self.parity_images < 1:
            raise ConfigError(f"parity_images: got {self.parity_images} | expected >= 1")

    @property
    def bounds(self) -> ParityBounds:
        return ParityBounds(self.max_abs_diff, self.min_label_agreement)


def load_segmenter(seg_run: Path):
    """The trained :class:`~promptseg.train.seg.Segmenter` of a ``train seg`` run (eval mode) and its classes."""
    from ..train.checkpoint import load_checkpoint
    from ..train.seg import Segmenter

    path = seg_run / "segmenter.pt"
    if not path.is_file():
        raise PromptsegError(f"{seg_run}: no segmenter.pt (train the segmenter first)")
    state = load_checkpoint(path)
    model = Segmenter(state["arch"], len(state["class_names"]), state["input_size"])
    model.load_state_dict(state["model"])
    return model.eval(), tuple(state["class_names"])


def parity_batches(data: str, split: str, limit: int, batch: int = 16) -> list[list[np.ndarray]]:
    """Up to ``limit`` real images of ``split``, in same-size batches."""
    images = [sample.load_image() for sample in list(VOCDataset(data, split))[:limit]]
    return [[images[i] for i in group] for group in group_by_size([im.shape[:2] for im in images], batch)]


def model_metadata(kind: str, class_names, input_size: int, method: str, text_sha: str = "",
                   extra: dict | None = None) -> ModelMetadata:
    """The metadata an exported graph carries (VOC palette colours, ImageNet normalisation, square input)."""
    from ..train.cams import IMAGENET_MEAN, IMAGENET_STD

    palette = voc_palette(256)
    offset = 0 if kind == "segmenter" else 1  # CAM channels are classes 1..C of the palette
    colours = tuple(tuple(int(c) for c in palette[i + offset]) for i in range(len(class_names)))
    return ModelMetadata(kind=kind, class_names=tuple(class_names), palette=colours, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, input_size=(input_size, input_size), method=method,
                         promptseg_version=__version__, text_features_sha256=text_sha, extra=extra or {})


def export_run(cfg: ExportConfig) -> dict:
    """Export, gate and describe; returns the export report (also written to ``export_report.json``)."""
    import onnx

    from ..train.pseudo import load_cam_run

    cfg.validate()
    run, out = Path(cfg.run), Path(cfg.out)
    seg_run, cam_run = run / f"seg_{cfg.method}", run / cfg.method
    for needed in (seg_run, cam_run):
        if not needed.is_dir():
            raise PromptsegError(f"{needed}: not found (is {run} a finished demo/pipeline run with method "
                                 f"{cfg.method!r}?)")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "export_config.json", cfg)
    segmenter, seg_classes = load_segmenter(seg_run)
    cam_net, cam_config, cam_report = load_cam_run(cam_run)
    data = cam_config["data"]
    if tuple(VOCDataset(data, cam_config["split"]).class_names) != seg_classes:
        raise PromptsegError(f"{seg_run} was trained on classes {seg_classes} | {cam_run} on another list")

    folded = fold_text_features(cam_run)
    text_sha = ""
    if folded is not None:
        write_npy_atomic(out / "text_features.npy", folded.features.astype("<f4"))
        text_sha = folded.sha256
    batches = parity_batches(data, cfg.parity_split, cfg.parity_images)
    example = torch.from_numpy(np.stack(batches[0][:2]).transpose(0, 3, 1, 2).astype(np.float32) / 255)

    graphs = {
        "segmenter": (SegmenterForExport(segmenter), SEGMENTER, ("background", *seg_classes), segmenter.input_size),
        "cam": (CamForExport(cam_net), CAM, seg_classes, int(cam_config["crop"])),
    }
    report: dict = {"method": cfg.method, "opset": OPSET, "files": {}}
    failures = []
    for kind, (module, spec, class_names, input_size) in graphs.items():
        # the CAM graph carries the run's background threshold: its pseudo-masks (and the INT8 gate) need it
        extra = {"source_run": str(seg_run)} if kind == "segmenter" else {
            "source_run": str(cam_run), "cam_threshold": str(cam_report["background_threshold"])}
        meta = model_metadata(kind, class_names, input_size, cfg.method, text_sha, extra)
        path = out / spec.filename
        model = export_onnx(module, spec, meta, example, path)
        entry = {"ops": sorted({n.op_type for n in model.graph.node}), "checker": "onnx.checker full_check passed"}
        try:
            entry.update(check_parity(module, path, spec, batches, cfg.bounds))
            entry["parity"] = "passed"
        except ParityError as exc:
            entry.update(exc.result)
            entry["parity"] = f"FAILED: {exc}"
            failures.append(str(exc))
        report["files"][spec.filename] = entry
    report["bounds"] = {"max_abs_diff": cfg.max_abs_diff, "min_label_agreement": cfg.min_label_agreement}
    write_json_atomic(out / "export_report.json", report)
    written = [out / spec.filename for _, spec, _, _ in graphs.values()]
    written += [out / "text_features.npy"] if folded is not None else []
    _write_manifest(out, cfg, folded, {"segmenter": read_json(seg_run / "config.json"), "cam": cam_config}, onnx,
                    written)
    if failures:
        raise ParityError("parity gate failed: " + " | ".join(failures))
    return report


def _write_manifest(out: Path, cfg: ExportConfig, folded, configs: dict, onnx_module, written: list[Path]) -> None:
    """``manifest.json`` of the files this export wrote (not whatever an earlier export left in the folder)."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in written}
    manifest = {
        "promptseg_version": __version__,
        "versions": {"torch": torch.__version__, "onnx": onnx_module.__version__, "opset": OPSET,
                     "python": platform.python_version()},
        "export": cfg,
        "files": files,
        "text_features": None if folded is None else {
            "file": "text_features.npy", "sha256": folded.sha256, "shape": list(folded.features.shape),
            "class_names": list(folded.class_names), "source": folded.source},
        "run_configs": configs,
    }
    write_json_atomic(out / "manifest.json", manifest)
