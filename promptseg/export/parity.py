"""The parity gate: PyTorch and ONNX Runtime on the same real images must agree.

Two numbers per exported file: the largest absolute difference over the float outputs, and the
share of pixels whose label (argmax over channels) agrees. Either outside its bound fails the export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PromptsegError
from ..runtime.processing import stack_batch
from ..runtime.spec import GraphSpec


@dataclass(frozen=True)
class ParityBounds:
    max_abs_diff: float = 1e-3
    min_label_agreement: float = 0.999


class ParityError(PromptsegError):
    """An exported graph disagrees with its PyTorch module beyond the bounds; ``result`` has the numbers."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


def _label_channel(spec: GraphSpec) -> str:
    return "logits" if "logits" in spec.output_names else "cams"


@torch.no_grad()
def check_parity(module: torch.nn.Module, onnx_path: str | Path, spec: GraphSpec,
                 image_batches: Sequence[Sequence[np.ndarray]], bounds: ParityBounds) -> dict:
    """Run both on every batch (``H x W x 3`` uint8 images of one size); raise :class:`ParityError`
    when outside ``bounds``; return ``{"max_abs_diff", "label_agreement", "images"}``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = module.eval()
    diffs, agree, pixels, images = [0.0], 0, 0, 0
    channel = _label_channel(spec)
    for batch in image_batches:
        x = stack_batch(batch)
        expected = dict(zip(spec.output_names, (t.numpy() for t in module(torch.from_numpy(x))), strict=True))
        got = dict(zip(spec.output_names, session.run(spec.output_names, {spec.input_names[0]: x}), strict=True))
        for name, value in expected.items():
            if value.dtype.kind == "f":
                diffs.append(float(np.abs(value - got[name]).max()))
        agree += int((expected[channel].argmax(1) == got[channel].argmax(1)).sum())
        pixels += expected[channel][:, 0].size
        images += len(batch)
    if not images:
        raise PromptsegError(f"{onnx_path}: no images to check parity on")
    worst = float(np.max(diffs))  # NaN stays NaN (Python's max would drop it) and fails the gate below
    result = {"max_abs_diff": worst, "label_agreement": agree / pixels, "images": images}
    failures = []
    if not worst <= bounds.max_abs_diff:
        failures.append(f"max |diff| {worst:.3g} > {bounds.max_abs_diff:g}")
    if result["label_agreement"] < bounds.min_label_agreement:
        failures.append(f"label agreement {result['label_agreement']:.5f} < {bounds.min_label_agreement}")
    if failures:
        raise ParityError(f"{Path(onnx_path).name}: PyTorch and ONNX Runtime disagree on {images} images: "
                          + "; ".join(failures), result)
    return result
