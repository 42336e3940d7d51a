"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when the installed
onnxruntime build has them (``onnxruntime-gpu``, JetPack's wheels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ...errors import PromptsegError
from ..spec import ModelMetadata, TensorSpec
from .base import InferenceError, ModelIO, Runner, format_shape

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
               "tensor(bool)": "bool"}


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception classes (plain ``Exception`` subclasses in its pybind module)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "RuntimeException", "NotImplemented", "ModelLoaded", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def resolve_providers(requested: Sequence[str] | str = ("cpu",)) -> list[str]:
    """Short names (``tensorrt``, ``cuda``, ``cpu``) or ``"auto"`` -> ONNX Runtime provider names, CPU last.

    ``auto`` takes every accelerated provider this build has; a provider asked for by name that the
    build lacks is an error, not a silent CPU fallback.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = [k for k, v in PROVIDERS.items() if v in available] if requested == "auto" else list(requested)
    for name in names:
        if name not in PROVIDERS:
            raise PromptsegError(f"provider: got {name!r} | expected one of {', '.join(PROVIDERS)} or auto")
        if PROVIDERS[name] not in available:
            have = [k for k, v in PROVIDERS.items() if v in available]
            raise PromptsegError(f"provider {name!r}: not in this onnxruntime build | available: {', '.join(have)}")
    ordered = [k for k in PROVIDERS if k in names and k != "cpu"] + ["cpu"]
    return [PROVIDERS[k] for k in ordered]


def session_from_onnx(path, providers: Sequence[str] | str = ("cpu",), threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` with full graph optimisation; TensorRT EP engines are
    cached beside the model (``engines/ort-trt/``) so a device builds them once."""
    import onnxruntime as ort

    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the CLI's output is ours
    if threads:
        options.intra_op_num_threads = threads
    resolved = resolve_providers(providers)
    provider_options = []
    for name in resolved:
        if name == PROVIDERS["tensorrt"]:
            cache = path.parent / "engines" / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            provider_options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                                     "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)})
        else:
            provider_options.append({})
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=resolved,
                                       provider_options=provider_options)
    except _ort_errors() as exc:
        raise PromptsegError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})") from None
    started = session.get_providers()
    missing = [name for name in resolved if name not in started]
    if missing and providers != "auto":  # ONNX Runtime falls back to the CPU quietly when a provider fails
        raise PromptsegError(f"{path}: ONNX Runtime could not start {', '.join(missing)} (its libraries or "
                             f"device are missing) and fell back to {', '.join(started)} | expected the providers "
                             f"asked for; ask for cpu, or auto to take what starts")
    return session


def _tensor_spec(arg) -> TensorSpec:
    if arg.type not in _ORT_DTYPES:
        raise PromptsegError(f"tensor {arg.name!r}: type {arg.type} | expected one of {', '.join(_ORT_DTYPES)}")
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, _ORT_DTYPES[arg.type], shape)


class OnnxrtRunner(Runner):
    """A promptseg ONNX file in an ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(self, model_path, providers: Sequence[str] | str = ("cpu",), threads: int | None = None) -> None:
        super().__init__(model_path)
        self.requested_providers = providers
        self.threads = threads
        self._session = None
        self._output_names: list[str] = []

    @property
    def providers(self) -> list[str]:
        """The providers the active session really uses, in priority order."""
        return list(self._session.get_providers()) if self._session is not None else []

    def _activate(self) -> ModelIO:
        self._session = session_from_onnx(self.model_path, self.requested_providers, self.threads)
        # Metadata from the session itself: no onnx import and no second parse on the device.
        props = self._session.get_modelmeta().custom_metadata_map
        metadata = ModelMetadata.from_props(props, source=str(self.model_path))
        inputs = tuple(_tensor_spec(a) for a in self._session.get_inputs())
        outputs = tuple(_tensor_spec(a) for a in self._session.get_outputs())
        self._output_names = [t.name for t in outputs]
        return ModelIO(metadata, inputs, outputs)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, dict(feed))
        except _ort_errors() as exc:
            shapes = ", ".join(f"{k} {format_shape(v.shape)}" for k, v in feed.items())
            raise InferenceError(f"{self.name}: ONNX Runtime failed on {shapes} "
                                 f"({str(exc).strip().splitlines()[0]})") from None
        return dict(zip(self._output_names, values, strict=True))

    def _deactivate(self) -> None:
        self._session = None
