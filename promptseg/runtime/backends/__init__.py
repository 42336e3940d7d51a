"""Backends: one :class:`~.base.Runner` interface over ONNX Runtime, TensorRT and OpenVINO.

``open_runner(model, backend, options)`` returns an inactive runner; nothing heavy is imported until
it is activated, so choosing a backend costs no import of the other.
"""

from __future__ import annotations

from ...errors import PromptsegError
from .base import BackendOptions, InferenceError, Runner, check_feed

BACKENDS = ("onnxruntime", "tensorrt", "openvino")

__all__ = ["BACKENDS", "BackendOptions", "InferenceError", "Runner", "check_feed", "import_backend", "open_runner"]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise PromptsegError(f"backend: got {backend!r} | expected one of {', '.join(BACKENDS)}")


def open_runner(model, backend: str = "onnxruntime", options: BackendOptions | None = None) -> Runner:
    """An inactive runner of ``model`` (an ONNX file; for TensorRT also a built ``.engine``)."""
    _check_backend(backend)
    options = (options or BackendOptions()).validate()
    if backend == "onnxruntime":
        from .onnxrt import OnnxrtRunner

        return OnnxrtRunner(model, providers=options.ort_providers, threads=options.threads)
    if backend == "openvino":
        from .openvino import OpenvinoRunner

        return OpenvinoRunner(model, options)
    from .tensorrt import TrtRunner

    return TrtRunner(model, options)


def import_backend(backend: str) -> None:
    """Import the backend's library now (the bench times it apart from building the session)."""
    _check_backend(backend)
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif backend == "openvino":
        from .openvino import import_openvino

        import_openvino()
    else:
        from .tensorrt import import_tensorrt

        import_tensorrt()
