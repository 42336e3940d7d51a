"""Segmentation metrics (numpy only): mIoU from an accumulated confusion matrix, and context leak.

mIoU is accumulated over the whole split (not averaged per image), as VOC and the papers we
reproduce report it. Context leak measures what CLIMS and SemPLeS fight: how much of a class's
predicted foreground lies on its typical background.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .data.palette import IGNORE_INDEX
from .errors import PromptsegError

__all__ = ["IGNORE_INDEX", "ConfusionMatrix", "ContextLeak", "miou_from_arrays"]


def _int_pair(pred: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as int64 of one shape, or a clear error (floats would hide rounding bugs)."""
    pred, other = np.asarray(pred), np.asarray(other)
    if pred.shape != other.shape:
        raise PromptsegError(f"pred shape {pred.shape} vs {other_name} shape {other.shape} | expected the same shape")
    for name, array in (("pred", pred), (other_name, other)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise PromptsegError(f"{name} dtype {array.dtype} | expected an integer array of class ids")
    return pred.astype(np.int64, copy=False).reshape(-1), other.astype(np.int64, copy=False).reshape(-1)


def _nan_mean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


class ConfusionMatrix:
    """Pixel confusion over ``num_classes`` ids (background included), accumulated over images."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise PromptsegError(f"num_classes: got {num_classes} | expected >= 1 (background included)")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows target, cols pred

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one image (or batch); pixels whose target is 255 are ignored."""
        pred, target = _int_pair(pred, target, "target")
        k = self.num_classes
        valid = target != IGNORE_INDEX
        pred, target = pred[valid], target[valid]
        if target.size and (target.min() < 0 or target.max() >= k):
            bad = np.unique(target[(target < 0) | (target >= k)])[:10].tolist()
            raise PromptsegError(f"target ids {bad} | expected 0..{k - 1} or {IGNORE_INDEX}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            bad = np.unique(pred[(pred < 0) | (pred >= k)])[:10].tolist()
            raise PromptsegError(f"pred ids {bad} on non-ignored pixels | expected 0..{k - 1}")
        self.matrix += np.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN where the class is absent from both target and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        out = np.full(self.num_classes, np.nan)
        present = union > 0
        out[present] = tp[present] / union[present]
        return out

    def miou(self) -> float:
        """Mean IoU over classes seen in target or prediction, as a fraction in 0..1."""
        return _nan_mean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct / counted pixels; NaN before any pixel is counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, class_names: Sequence[str], percent: bool = False) -> dict:
        """JSON-ready metrics (fractions, or 0..100 with ``percent``); absent classes map to None.
        ``class_names`` includes background."""
        if len(class_names) != self.num_classes:
            raise PromptsegError(
                f"class_names: got {len(class_names)} names | expected {self.num_classes} (background included)"
            )
        scale = 100.0 if percent else 1.0
        ious = self.iou()
        return {
            "miou": scale * self.miou(),
            "pixel_accuracy": scale * self.pixel_accuracy(),
            "per_class_iou": {
                str(name): (None if np.isnan(v) else scale * float(v))
                for name, v in zip(class_names, ious, strict=True)
            },
        }

    def reset(self) -> None:
        self.matrix[:] = 0


class ContextLeak:
    """Share of predicted foreground of class k that falls on k's context region."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise PromptsegError(f"num_classes: got {num_classes} | expected >= 1 foreground class")
        self.num_classes = int(num_classes)
        self.fg = np.zeros(num_classes, dtype=np.int64)  # pixels predicted k
        self.leak = np.zeros(num_classes, dtype=np.int64)  # pixels predicted k on k's context

    def update(self, pred: np.ndarray, context: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add one image. ``pred``: 0 bg, 1..C, 255 ignored; ``context``: 0 none, k = context of k.

        With ``labels`` (float[C] multi-hot), only classes present in the image are counted, so
        a CAM evaluated per ground-truth class is not charged for classes it was never asked about.
        """
        pred, context = _int_pair(pred, context, "context")
        c = self.num_classes
        bad = (pred < 0) | ((pred > c) & (pred != IGNORE_INDEX))
        if bad.any():
            raise PromptsegError(f"pred ids {np.unique(pred[bad])[:10].tolist()} | expected 0..{c} or {IGNORE_INDEX}")
        fg_pixels = (pred >= 1) & (pred <= c)
        fg = np.bincount(pred[fg_pixels] - 1, minlength=c)
        leak = np.bincount(pred[fg_pixels & (pred == context)] - 1, minlength=c)
        if labels is not None:
            keep = np.asarray(labels).reshape(-1)
            if keep.shape[0] != c:
                raise PromptsegError(f"labels length {keep.shape[0]} | expected {c}")
            keep = keep > 0
            fg, leak = fg * keep, leak * keep
        self.fg += fg
        self.leak += leak

    def per_class(self) -> np.ndarray:
        """``leak_k / fg_k`` per class; NaN where class k was never predicted."""
        out = np.full(self.num_classes, np.nan)
        seen = self.fg > 0
        out[seen] = self.leak[seen] / self.fg[seen]
        return out

    def overall(self) -> float:
        """Pooled leak over all classes; 0 when nothing was predicted foreground."""
        total = int(self.fg.sum())
        return float(self.leak.sum() / total) if total else 0.0


def miou_from_arrays(
    preds: Iterable[np.ndarray], targets: Iterable[np.ndarray], num_classes: int
) -> float:
    """mIoU (fraction) of paired prediction/target masks; ``num_classes`` includes background."""
    matrix = ConfusionMatrix(num_classes)
    preds, targets = list(preds), list(targets)
    if len(preds) != len(targets):
        raise PromptsegError(f"got {len(preds)} predictions and {len(targets)} targets | expected equal counts")
    for pred, target in zip(preds, targets, strict=True):
        matrix.update(pred, target)
    return matrix.miou()


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP of one class: mean precision at the rank of each positive (NaN if none)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(labels).reshape(-1) > 0
    if scores.shape != positive.shape:
        raise PromptsegError(f"average_precision: got {scores.shape} scores and {positive.shape} labels")
    if not positive.any():
        return float("nan")
    hits = positive[np.argsort(-scores, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision[hits].mean())
