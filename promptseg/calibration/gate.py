"""The accuracy gate and the latency table: FP32 and every INT8 candidate on the same held-out images.

Scores per model: mIoU against the ground-truth masks (when the gate images have them), mIoU of
its labels taking the FP32 model's labels as the target, and label agreement (share of pixels
whose label equals FP32's). Latency is the better of two block medians per model, so a burst of
load on a shared machine spoils one block rather than the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..eval import ConfusionMatrix
from .images import ImageBatches


def ort_session(model, threads: int):
    """A CPU session: ``threads`` intra-op threads, one inter-op thread, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model) if not isinstance(model, bytes) else model, options,
                                providers=["CPUExecutionProvider"])


@dataclass
class GateScore:
    miou: float | None  # 0..100 against ground truth; None without masks
    miou_vs_fp32: float  # 0..100, FP32 labels as the target
    label_agreement: float  # 0..1
    images: int


def evaluate(sessions: Mapping[str, object], gate: ImageBatches, num_classes: int, *, input_name: str = "image",
             labels_name: str = "labels", reference: str = "fp32") -> dict[str, GateScore]:
    """Run every session on every gate batch once; ``sessions[reference]`` is the FP32 model."""
    if reference not in sessions:
        raise KeyError(f"sessions lack the reference {reference!r}")
    gt = {name: ConfusionMatrix(num_classes) for name in sessions}
    vs_ref = {name: ConfusionMatrix(num_classes) for name in sessions}
    agree = dict.fromkeys(sessions, 0)
    pixels, images, has_masks = 0, 0, True
    for indices, batch, masks in gate.with_masks():
        labels = {name: s.run([labels_name], {input_name: batch})[0] for name, s in sessions.items()}
        ref = labels[reference]
        for name, pred in labels.items():
            vs_ref[name].update(pred, ref)
            agree[name] += int((pred == ref).sum())
            if masks is None:
                has_masks = False
            else:
                for one, mask in zip(pred, masks, strict=True):
                    gt[name].update(one, mask)
        pixels += ref.size
        images += len(indices)
    return {name: GateScore(miou=100 * gt[name].miou() if has_masks else None,
                            miou_vs_fp32=100 * vs_ref[name].miou(), label_agreement=agree[name] / pixels,
                            images=images)
            for name in sessions}


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
