"""INT8 calibration from real images: TensorRT-style QDQ, the fastest CPU model, and an accuracy gate;
for TensorRT, the layer that breaks INT8 named and repaired (equalisation, per-tensor ranges, float fallback).

Public face: :class:`CalibrationConfig` (with :class:`Method`, :class:`Target`) and
:func:`calibrate`; ``promptseg calibrate`` is the command line over them. Needs only the base
install (onnx, onnxruntime with its ``quantization`` package), no torch.
"""

from .config import CPU_CANDIDATE_NAMES, CalibrationConfig, CpuCandidate, Method, Target

_RUN = ("CalibrationGateError", "calibrate", "output_name")


def __getattr__(name: str):
    """The run's names load on first use: importing them pulls onnx and ONNX Runtime's quantizer (about
    2 s), which every ``promptseg`` command, ``infer`` on a device included, paid at start-up before."""
    if name in _RUN:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["CPU_CANDIDATE_NAMES", "CalibrationConfig", "CalibrationGateError", "CpuCandidate", "Method", "Target",
           "calibrate", "output_name"]
