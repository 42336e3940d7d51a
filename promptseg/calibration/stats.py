"""Statistics of chosen float tensors over the calibration images: per-channel ranges and histograms.

ONNX Runtime's calibrators reduce every tensor of the model to one range. Two repairs need more,
and only for a few tensors: cross-layer equalisation needs each channel's range, and a better
range for one sensitive tensor needs its histogram (percentile, or TensorRT's entropy threshold,
computed by ONNX Runtime's own :class:`HistogramCollector`). One pass runs the model with those
tensors as extra outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import PromptsegError
from .quantize import quiet

HISTOGRAM_BINS = 2048  # over [-amax, amax], as ONNX Runtime's entropy calibrator bins
ENTROPY_QUANTIZED_BINS = 128  # int8's positive half


@dataclass
class TensorStats:
    """One tensor over all calibration images."""

    channel_amax: np.ndarray  # C: max |x| per channel (axis 1)
    low: float
    high: float
    histogram: np.ndarray | None  # HISTOGRAM_BINS counts over [-amax, amax], when asked for
    amax: float | None  # the histogram's half-width

    def percentile_amax(self, percentile: float) -> float:
        """The ``percentile`` of ``|x|`` (bin upper edge): the symmetric range a percentile calibration keeps."""
        counts = self._absolute_histogram()
        cdf = np.cumsum(counts) / max(counts.sum(), 1)
        index = min(int(np.searchsorted(cdf, percentile / 100.0)), len(counts) - 1)
        return float(self.amax * (index + 1) / len(counts))

    def entropy_amax(self) -> float:
        """TensorRT's entropy (KL-divergence) threshold, as ONNX Runtime's entropy calibrator computes it."""
        from onnxruntime.quantization.calibrate import HistogramCollector

        edges = np.linspace(-self.amax, self.amax, HISTOGRAM_BINS + 1, dtype=np.float32)
        collector = HistogramCollector("entropy", True, HISTOGRAM_BINS, ENTROPY_QUANTIZED_BINS, 100.0, "same")
        with quiet():
            low, high = collector.get_entropy_threshold(
                (self.histogram, edges, np.float32(self.low), np.float32(self.high), np.float32(self.amax)),
                ENTROPY_QUANTIZED_BINS)
        return float(max(abs(low), abs(high)))

    def _absolute_histogram(self) -> np.ndarray:
        if self.histogram is None or not self.amax:
            raise PromptsegError("tensor statistics: no histogram collected | expected hist_amax for this tensor")
        half = HISTOGRAM_BINS // 2
        return self.histogram[half:] + self.histogram[:half][::-1]


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the float tensors ``names`` (its own outputs first)."""
    out = copy.deepcopy(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


def collect(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]], names: Iterable[str], *,
            hist_amax: Mapping[str, float] | None = None, threads: int = 2) -> dict[str, TensorStats]:
    """Per-channel ranges of ``names`` over ``batches``; histograms too for the tensors in ``hist_amax``
    (their symmetric range, from a min/max calibration)."""
    from .gate import ort_session

    names = list(dict.fromkeys(names))
    hist_amax = dict(hist_amax or {})
    if not names:
        return {}
    session = ort_session(with_outputs(model, names), threads)
    channel: dict[str, np.ndarray] = {}
    low = dict.fromkeys(names, np.inf)
    high = dict.fromkeys(names, -np.inf)
    hist = {name: np.zeros(HISTOGRAM_BINS, np.int64) for name in hist_amax}
    seen = 0
    for batch in batches:
        values = session.run(names, dict(batch))
        seen += 1
        for name, x in zip(names, values, strict=True):
            x = np.asarray(x, np.float32)
            reduce_axes = tuple(a for a in range(x.ndim) if a != 1) if x.ndim > 1 else (0,)
            amax = np.abs(x).max(axis=reduce_axes) if x.size else np.zeros(0, np.float32)
            channel[name] = amax if name not in channel else np.maximum(channel[name], amax)
            low[name] = min(low[name], float(x.min()))
            high[name] = max(high[name], float(x.max()))
            if name in hist and hist_amax[name] > 0:
                edge = hist_amax[name]
                hist[name] += np.histogram(np.clip(x, -edge, edge), HISTOGRAM_BINS, range=(-edge, edge))[0]
    if not seen:
        raise PromptsegError("tensor statistics: got no calibration batches | expected at least one")
    return {name: TensorStats(channel[name], low[name], high[name], hist.get(name),
                              hist_amax.get(name)) for name in names}
