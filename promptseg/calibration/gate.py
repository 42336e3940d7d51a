"""The accuracy gate and the latency table: FP32 and every INT8 model on the same held-out images.

A :class:`Labeller` turns a graph's outputs into label maps: the segmenter's ``labels``, or the CAM
graph's ``cams`` made into pseudo-masks at the run's threshold, as training makes them. The
:class:`Gate` runs the FP32 model once and scores any other model against it and against the
ground-truth masks (when the gate images have them): mIoU and per-class IoU, label agreement, and
foreground agreement (agreement on the pixels either model calls foreground, which an all-background
model cannot pass on images with real foreground). Latency is the better of two block medians per
model, so a burst of load on a shared machine spoils one block rather than the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..eval import ConfusionMatrix
from ..runtime.processing import cams_to_mask, stack_batch
from .images import ImageBatches

GATE_CACHE_BYTES = 256 * 2 ** 20  # decoded gate batches kept in memory up to this size, else decoded per pass


def ort_session(model, threads: int, *, int8_kernels: bool = True):
    """A CPU session: ``threads`` intra-op threads, one inter-op thread. ``model``: a path, serialised
    bytes or an ``onnx.ModelProto``.

    ``int8_kernels``: all graph optimisations, so Q/DQ pairs around an op fuse into ONNX Runtime's
    own int8 kernels (what its CPU provider runs, and its speed). False: basic optimisations only,
    so each op computes in float between its DequantizeLinear and the next QuantizeLinear, which is
    TensorRT's arithmetic up to rounding: int8 x int8 products summed exactly. The difference is
    real on this CPU: without VNNI, ONNX Runtime's u8s8 kernels add pairs of products in 16 bits and
    saturate where a channel's weights sit near +-127 (a box filter changed 3.7% of a test model's
    labels through the fused kernels, 0.3% in float between Q/DQ).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if int8_kernels
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Labeller:
    """From a graph's outputs to ``N x H x W`` uint8 label maps.

    ``segmenter``: its ``labels`` output. ``cam``: its ``cams`` (``N x C x H x W`` in 0..1), the
    classes an image is not labelled with zeroed when its image-level labels are known (a VOC split),
    then :func:`cams_to_mask` at ``threshold``: the pseudo-masks the segmenter is trained on.
    """

    kind: str
    threshold: float | None = None

    @property
    def output(self) -> str:
        return "labels" if self.kind == "segmenter" else "cams"

    @property
    def float_output(self) -> str:
        """The float output whose error the cheap sensitivity proxy measures."""
        return "logits" if self.kind == "segmenter" else "cams"

    def labels(self, output: np.ndarray, image_labels: Sequence[np.ndarray | None]) -> np.ndarray:
        if self.kind == "segmenter":
            return output.astype(np.uint8)
        masks = []
        for cams, present in zip(output, image_labels, strict=True):
            if present is not None:
                cams = cams * (np.asarray(present) > 0)[:, None, None]
            masks.append(cams_to_mask(cams, self.threshold))
        return np.stack(masks)

    def describe(self) -> str:
        if self.kind == "segmenter":
            return "the segmenter's labels"
        return (f"pseudo-masks from the CAMs at threshold {self.threshold} (the run's), classes the image is not "
                f"labelled with zeroed when its labels are known")


@dataclass
class GateScore:
    miou: float | None  # 0..100 against ground truth; None without masks
    miou_vs_fp32: float  # 0..100, FP32 labels as the target
    label_agreement: float  # 0..1, share of pixels whose label equals FP32's
    foreground_agreement: float  # 0..1, the same on the pixels FP32 or this model calls foreground
    per_class_iou: dict[str, float | None]  # 0..100, against ground truth (or FP32's labels without masks)
    images: int


@dataclass
class _Batch:
    indices: list[int]
    images: np.ndarray | None  # None: decoded again on every pass (too large to keep)
    masks: list[np.ndarray] | None
    image_labels: list[np.ndarray | None]
    reference: np.ndarray  # N x H x W uint8, the FP32 model's label maps


class Gate:
    """The held-out images with their masks and image-level labels, and the FP32 model's label maps.

    Built once per run (the FP32 model runs once); :meth:`score` then runs one model over the
    images and :meth:`drop` turns its score into the gate's number: mIoU points lost against FP32
    with ground truth, else the share of pixels whose label changed, in percentage points.
    """

    def __init__(self, images: ImageBatches, reference, labeller: Labeller, class_names: Sequence[str], *,
                 max_drop: float = 1.0, min_foreground_agreement: float = 0.9, input_name: str = "image",
                 threads: int = 2, int8_kernels: bool = True):
        self.images = images
        self.max_drop = max_drop
        self.min_foreground_agreement = min_foreground_agreement
        self.int8_kernels = int8_kernels  # how :meth:`score` runs a model it is given (see ort_session)
        self.labeller = labeller
        self.class_names = tuple(class_names)
        self.input_name = input_name
        self.threads = threads
        self._batches: list[_Batch] = []
        kept = 0
        with_gt = True
        for indices, batch, masks in images.with_masks():
            image_labels = [images.refs[i].image_labels for i in indices]
            reference_labels = self._run(reference, batch, image_labels)
            keep = kept + batch.nbytes <= GATE_CACHE_BYTES
            kept += batch.nbytes if keep else 0
            with_gt = with_gt and masks is not None
            self._batches.append(_Batch(indices, batch if keep else None, masks, image_labels, reference_labels))
        self.with_gt = with_gt
        self.reference = self._score([b.reference for b in self._batches])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _run(self, session, batch: np.ndarray, image_labels) -> np.ndarray:
        return self.labeller.labels(session.run([self.labeller.output], {self.input_name: batch})[0], image_labels)

    def predictions(self, session) -> list[np.ndarray]:
        """The label maps of ``session`` (anything with ONNX Runtime's ``run``), one array per batch."""
        out = []
        for b in self._batches:
            images = b.images if b.images is not None else stack_batch([self.images.load(i) for i in b.indices])
            out.append(self._run(session, images, b.image_labels))
        return out

    def score(self, model) -> GateScore:
        """Score a session, or an ``onnx.ModelProto`` / path (a session is made for it)."""
        session = model if hasattr(model, "run") else ort_session(model, self.threads,
                                                                  int8_kernels=self.int8_kernels)
        return self._score(self.predictions(session))

    def _score(self, predictions: list[np.ndarray]) -> GateScore:
        gt, vs_ref = ConfusionMatrix(self.num_classes), ConfusionMatrix(self.num_classes)
        agree = pixels = fg_agree = fg_pixels = images = 0
        for b, pred in zip(self._batches, predictions, strict=True):
            vs_ref.update(pred, b.reference)
            same = pred == b.reference
            foreground = (pred > 0) | (b.reference > 0)
            agree += int(same.sum())
            fg_agree += int((same & foreground).sum())
            fg_pixels += int(foreground.sum())
            pixels += pred.size
            images += len(b.indices)
            if self.with_gt:
                for one, mask in zip(pred, b.masks, strict=True):
                    gt.update(one, mask)
        per_class = (gt if self.with_gt else vs_ref).iou()
        return GateScore(miou=100 * gt.miou() if self.with_gt else None, miou_vs_fp32=100 * vs_ref.miou(),
                         label_agreement=agree / pixels,
                         foreground_agreement=fg_agree / fg_pixels if fg_pixels else 1.0,
                         per_class_iou={name: None if np.isnan(v) else round(100 * float(v), 3)
                                        for name, v in zip(self.class_names, per_class, strict=True)},
                         images=images)

    def drop(self, score: GateScore) -> float:
        """The gate's number for ``score``: FP32 mIoU - its mIoU, or 100 x the share of changed labels."""
        if self.with_gt:
            return self.reference.miou - score.miou
        return 100.0 * (1.0 - score.label_agreement)

    def passes(self, score: GateScore) -> bool:
        """Within ``max_drop``; without ground truth also ``min_foreground_agreement``: changed labels
        counted over all pixels hide a model that loses the foreground of mostly-background images."""
        within = self.drop(score) <= self.max_drop
        return bool(within if self.with_gt else within and score.foreground_agreement >= self.min_foreground_agreement)

    def metric(self) -> str:
        what = self.labeller.describe()
        if self.with_gt:
            return f"mIoU of {what} against the ground-truth masks of held-out images (points); drop = FP32 - INT8"
        return (f"no ground truth: drop = share of held-out pixels whose INT8 label ({what}) differs from the FP32 "
                "label, in percentage points (an estimate of the loss, not a measured mIoU: miou_fp32 and miou_int8 "
                "are null; miou_vs_fp32 per candidate is the mIoU of the INT8 labels taking the FP32 labels as the "
                f"target); the gate also needs foreground_agreement >= {self.min_foreground_agreement} (the share of "
                "pixels FP32 or INT8 calls foreground whose labels agree)")


def measure_latency(sessions: Mapping[str, object], inputs: Mapping[int, np.ndarray], runs: int, *,
                    input_name: str = "image", warmup: int = 2) -> dict[str, dict[int, dict[str, float]]]:
    """Milliseconds per image, ``{name: {batch: {"median": ms, "min": ms}}}``, for each batch in ``inputs``.

    Each model runs in a block of its own (warm-up, then ``runs`` timed runs), twice: the models in
    order, then in reverse. A model keeps its better block median, so a burst of load from elsewhere
    spoils one block, not the result. Blocks, not interleaved runs: alternating sessions run for
    run evicts each one's weights from the caches, which measured INT8 at 1.97x FP32 on this
    demo where separate processes measured 1.24x.
    """
    names = list(sessions)
    result: dict[str, dict[int, dict[str, float]]] = {name: {} for name in names}
    for batch, x in inputs.items():
        feed = {input_name: x}
        blocks: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for order in (names, names[::-1]):
            for name in order:
                for _ in range(warmup):
                    sessions[name].run(None, feed)
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    sessions[name].run(None, feed)
                    times.append(time.perf_counter() - start)
                blocks[name].append(1000.0 * np.asarray(times) / len(x))
        for name in names:
            result[name][batch] = {"median": float(min(np.median(b) for b in blocks[name])),
                                   "min": float(min(b.min() for b in blocks[name]))}
    return result
