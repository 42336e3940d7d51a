"""OpenVINO's side of the CPU target: NNCF's post-training quantization of the ONNX, and OpenVINO
runners shaped like ONNX Runtime sessions, so the accuracy gate and the latency runs treat every
candidate alike.

NNCF quantizes the ONNX itself (its ONNX backend) and returns a Q/DQ ONNX that keeps our metadata,
so the deployed file stays one ONNX that both runtimes read; OpenVINO runs its Q/DQ layers in int8.
It takes its statistics from the same calibration images as ONNX Runtime's quantizer, one image per
item (NNCF's statistics are per sample), and leaves the output tail (head merge, resizes, argmax)
float like the other candidates. Needs the ``[openvino]`` extra (``openvino``, ``nncf``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from ..errors import PromptsegError
from ..runtime.backends import BackendOptions, open_runner
from ..runtime.spec import METADATA_PREFIX
from .images import ImageBatches
from .quantize import output_tail

NNCF_NOT_INSTALLED = "nncf not installed: `pip install promptseg[openvino]` (OpenVINO's post-training quantizer)"
# NNCF presets: PERFORMANCE quantizes activations symmetric (s8), MIXED asymmetric (u8); weights are
# symmetric per-channel int8 in both
NNCF_PRESETS = {"s8": "PERFORMANCE", "u8": "MIXED"}


def import_nncf():
    try:
        import nncf
    except ImportError:
        raise PromptsegError(NNCF_NOT_INSTALLED) from None
    return nncf


class SingleImages:
    """The calibration batches as one-image feeds (``1 x 3 x H x W``), re-iterable (NNCF passes over
    them more than once) and decoded on demand, as the batches are."""

    def __init__(self, images: ImageBatches):
        self.images = images

    def __len__(self) -> int:
        return len(self.images.refs)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.images:
            for name, value in batch.items():
                for one in value:
                    yield {name: one[None]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF draws progress bars on stdout and logs its choices through its own logger."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize_nncf(fp32_path: Path, out_path: Path, images: ImageBatches, activation: str,
                  extra: dict[str, str]) -> onnx.ModelProto:
    """NNCF's int8 Q/DQ ONNX of ``fp32_path`` (``activation``: ``s8`` or ``u8``) written to ``out_path``.

    The overflow fix is on for every layer: on a CPU without VNNI, int8 convolutions sum u8 x s8
    pairs in int16 (AVX2's ``vpmaddubsw``), which full-range weights overflow; 7-bit weights do not.
    """
    if activation not in NNCF_PRESETS:
        raise PromptsegError(f"activation: got {activation!r} | expected one of {', '.join(NNCF_PRESETS)}")
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = onnx.load(str(fp32_path))
    feeds = SingleImages(images)
    with _quiet():
        quantized = nncf.quantize(model, nncf.Dataset(feeds), preset=getattr(nncf.QuantizationPreset,
                                                                              NNCF_PRESETS[activation]),
                                  target_device=nncf.TargetDevice.CPU, subset_size=len(feeds),
                                  ignored_scope=nncf.IgnoredScope(names=output_tail(model)),
                                  advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))
    for key, value in extra.items():
        quantized.metadata_props.add(key=METADATA_PREFIX + "extra." + key, value=value)
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(out_path))
    return quantized


class OpenvinoSession:
    """An active OpenVINO runner with ONNX Runtime's ``run(output_names, feed)``: what the gate and
    the latency code call. A precision the CPU cannot run (bf16 without bf16 units) is an error here:
    a candidate that would only repeat another one's fp32 is not a candidate."""

    def __init__(self, model: Path, threads: int, precision: str | None = None):
        from importlib.metadata import version

        self.runner = open_runner(model, "openvino", BackendOptions(threads=threads, precision=precision)).activate()
        if precision is not None and self.runner.precision != precision:
            note = self.runner.precision_note
            self.runner.deactivate()
            raise PromptsegError(f"precision {precision}: {note}")
        self.version = version("openvino")

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.infer(feed)
        return [out[name] for name in (output_names or out)]
