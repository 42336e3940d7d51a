"""``promptseg compare``: two models on the same dataset images, Polygraphy-style.

Reports how far the logits drift (max and mean absolute difference), how often the labels agree,
and each model's mIoU against the dataset's ground truth, so an INT8 or FP16 build can be judged
by both the numbers it changes and the accuracy it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.voc import VOCDataset
from ..errors import PromptsegError
from ..eval import ConfusionMatrix
from .backends import BACKENDS, BackendOptions, open_runner
from .processing import group_by_size, stack_batch


@dataclass(frozen=True)
class CompareConfig:
    model_a: str
    model_b: str
    data: str
    split: str = "val"
    limit: int | None = None
    batch: int = 8
    backend_a: str = "onnxruntime"
    backend_b: str = "onnxruntime"
    options: BackendOptions = field(default_factory=BackendOptions)

    def validate(self) -> CompareConfig:
        for backend in (self.backend_a, self.backend_b):
            if backend not in BACKENDS:
                raise PromptsegError(f"backend: got {backend!r} | expected one of {', '.join(BACKENDS)}")
        if self.limit is not None and self.limit < 1:
            raise PromptsegError(f"limit: got {self.limit} | expected >= 1")
        if self.batch < 1:
            raise PromptsegError(f"batch: got {self.batch} | expected >= 1")
        self.options.validate()
        return self


def _check_models(meta_a, meta_b, dataset: VOCDataset, cfg: CompareConfig) -> None:
    for path, meta in ((cfg.model_a, meta_a), (cfg.model_b, meta_b)):
        if meta.kind != "segmenter":
            raise PromptsegError(f"{path}: a {meta.kind} model | expected a segmenter (compare reads its logits)")
    if meta_a.class_names != meta_b.class_names:
        raise PromptsegError(f"{cfg.model_b}: classes {list(meta_b.class_names)} | expected the classes of "
                             f"{cfg.model_a}: {list(meta_a.class_names)}")
    if tuple(meta_a.class_names[1:]) != tuple(dataset.class_names):
        raise PromptsegError(f"{cfg.data}: classes {list(dataset.class_names)} | expected the models' "
                             f"foreground classes {list(meta_a.class_names[1:])}")


def compare_models(cfg: CompareConfig) -> dict:
    """Both models on up to ``limit`` images of ``split``; returns the JSON-ready report."""
    cfg.validate()
    dataset = VOCDataset(cfg.data, cfg.split)
    samples = list(dataset)[: cfg.limit] if cfg.limit else list(dataset)
    if not samples:
        raise PromptsegError(f"{cfg.data}: split {cfg.split!r} has no images")
    options = BackendOptions.from_json({**cfg.options.to_json(), "max_batch": cfg.batch})
    with open_runner(cfg.model_a, cfg.backend_a, options) as run_a, \
            open_runner(cfg.model_b, cfg.backend_b, options) as run_b:
        _check_models(run_a.metadata, run_b.metadata, dataset, cfg)
        classes = len(run_a.metadata.class_names)
        matrices = {"a": ConfusionMatrix(classes), "b": ConfusionMatrix(classes)}
        worst, abs_sum, values, agree, pixels = 0.0, 0.0, 0, 0, 0
        images = [s.load_image() for s in samples]
        for group in group_by_size([im.shape[:2] for im in images], cfg.batch):
            x = stack_batch([images[i] for i in group])
            out_a, out_b = run_a.infer({"image": x}), run_b.infer({"image": x})
            diff = np.abs(out_a["logits"].astype(np.float64) - out_b["logits"])
            worst, abs_sum, values = max(worst, float(diff.max())), abs_sum + float(diff.sum()), values + diff.size
            agree += int((out_a["labels"] == out_b["labels"]).sum())
            pixels += out_a["labels"].size
            for k, i in enumerate(group):
                target = samples[i].load_mask()
                matrices["a"].update(out_a["labels"][k], target)
                matrices["b"].update(out_b["labels"][k], target)
        names = run_a.metadata.class_names
        report = {"data": str(cfg.data), "split": cfg.split, "images": len(samples),
                  "logits": {"max_abs_diff": worst, "mean_abs_diff": abs_sum / values},
                  "label_agreement": agree / pixels}
        for tag, runner, backend in (("a", run_a, cfg.backend_a), ("b", run_b, cfg.backend_b)):
            report[f"model_{tag}"] = {"path": str(Path(runner.model_path)), "backend": backend,
                                      "precision": runner.precision, "precision_note": runner.precision_note,
                                      **matrices[tag].summary(names)}
    report["miou_delta"] = report["model_b"]["miou"] - report["model_a"]["miou"]
    return report
