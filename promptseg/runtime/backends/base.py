"""The one runner interface every backend implements (Polygraphy's layout): activate, I/O specs,
``infer`` with input checks, deactivate; a context manager.

``infer`` checks names, dtypes and shapes here, once, so each backend's ``_infer`` only runs.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...errors import PromptsegError
from ..engine_cache import ShapeProfile
from ..precision import model_precision
from ..spec import ModelMetadata, TensorSpec


class InferenceError(PromptsegError):
    """A backend failed on one input (a shape outside the engine's profile, a kernel error)."""


Bounds = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class BackendOptions:
    """Options of every backend in one validated place (each backend reads its own).

    ONNX Runtime: ``providers`` (short names or ``("auto",)``), ``threads``. TensorRT, when given an
    ONNX file: ``precision`` (None: the graph's), ``profile`` (None: batch 1..``max_batch``, sides
    ``MIN_SIDE``..``max_side``, tuned for the metadata's input size), ``workspace_mib``, ``cache_dir``
    (None: ``engines/`` beside the model), ``timing_cache``. OpenVINO: ``precision`` (None: the graph's;
    ``bf16`` where the CPU has it), ``threads``.
    """

    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    precision: str | None = None
    profile: ShapeProfile | None = None
    max_batch: int = 1
    max_side: int = 1024
    workspace_mib: int = 1024
    cache_dir: str | None = None
    timing_cache: str | None = None

    def validate(self) -> BackendOptions:
        if self.threads is not None and self.threads < 1:
            raise PromptsegError(f"threads: got {self.threads} | expected >= 1")
        if self.max_batch < 1:
            raise PromptsegError(f"max_batch: got {self.max_batch} | expected >= 1")
        if self.workspace_mib < 1:
            raise PromptsegError(f"workspace: got {self.workspace_mib} MiB | expected >= 1")
        if self.profile is not None:
            self.profile.validate()
        return self

    @property
    def ort_providers(self) -> tuple[str, ...] | str:
        return "auto" if self.providers == ("auto",) else self.providers

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, record: dict) -> BackendOptions:
        """Inverse of :meth:`to_json` (the bench hands options to its subprocess as JSON)."""
        record = dict(record, providers=tuple(record["providers"]))
        if record.get("profile") is not None:
            record["profile"] = ShapeProfile(**{k: tuple(v) for k, v in record["profile"].items()})
        return cls(**record)


@dataclass(frozen=True)
class ModelIO:
    """What an activated backend found in the model: its metadata and its real I/O tensors."""

    metadata: ModelMetadata
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def format_shape(shape: Sequence) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_feed(feed: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec],
               bounds: Callable[[str], Bounds | None] = lambda name: None) -> None:
    """Raise naming the tensor, what was received and what was expected, for the first bad input.

    String dims in ``inputs`` are dynamic (any size >= 1); ``bounds(name)`` may narrow them to an
    inclusive ``(min_shape, max_shape)`` range, as a TensorRT optimisation profile does.
    """
    expected = [t.name for t in inputs]
    if sorted(feed) != sorted(expected):
        raise PromptsegError(f"inputs: got {sorted(feed)} | expected {expected}")
    for spec in inputs:
        value = feed[spec.name]
        if not isinstance(value, np.ndarray):
            raise PromptsegError(f"input {spec.name!r}: got {type(value).__name__} | expected a numpy array")
        if value.dtype != np.dtype(spec.dtype):
            raise PromptsegError(f"input {spec.name!r}: got dtype {value.dtype} | expected {spec.dtype}")
        if (value.ndim != len(spec.shape) or min(value.shape, default=1) < 1
                or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, value.shape, strict=True))):
            raise PromptsegError(f"input {spec.name!r}: got shape {format_shape(value.shape)} | "
                                 f"expected {format_shape(spec.shape)}")
        limits = bounds(spec.name)
        if limits is not None:
            low, high = limits
            if any(not lo <= s <= hi for s, lo, hi in zip(value.shape, low, high, strict=True)):
                wanted = format_shape(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in zip(low, high, strict=True))
                raise PromptsegError(f"input {spec.name!r}: got shape {format_shape(value.shape)} | "
                                     f"expected {wanted} (the engine's optimisation profile)")


class Runner(abc.ABC):
    """One model on one backend. Use as ``with runner: runner.infer({"image": x})``."""

    backend = "base"

    def __init__(self, model_path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise PromptsegError(f"{self.model_path}: model file not found")
        self.is_active = False
        self._io: ModelIO | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.model_path.name}"

    # -- lifecycle

    def activate(self) -> Runner:
        if self.is_active:
            raise PromptsegError(f"{self.name}: already active | expected one activation at a time")
        io = self._activate()
        self.is_active = True
        try:
            _check_graph(self.model_path, io)
        except PromptsegError:
            self.deactivate()
            raise
        self._io = io
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False
            self._io = None

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    # -- what the model is

    def _active_io(self) -> ModelIO:
        if not self.is_active or self._io is None:
            raise PromptsegError(f"{self.name}: not active | expected `with runner:` or runner.activate() first")
        return self._io

    @property
    def metadata(self) -> ModelMetadata:
        return self._active_io().metadata

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._active_io().inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self._active_io().outputs

    @property
    def precision(self) -> str:
        """``fp32``/``fp16``/``int8``, read from the graph."""
        return model_precision(self.model_path)

    @property
    def precision_note(self) -> str:
        """Why :attr:`precision` differs from what was asked (bf16 on a CPU without it), "" when it does not."""
        return ""

    def shape_bounds(self, name: str) -> Bounds | None:
        """Inclusive ``(min, max)`` input shape the backend can run, where it has one."""
        return None

    # -- running

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for one batch; ``feed`` is checked against :meth:`input_specs` first."""
        io = self._active_io()
        check_feed(feed, io.inputs, self.shape_bounds)
        return self._infer(feed)

    @abc.abstractmethod
    def _activate(self) -> ModelIO: ...

    @abc.abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...


def _check_graph(path: Path, io: ModelIO) -> None:
    """The model's tensors must be the ones its metadata's graph spec names, with the spec's dtypes."""
    graph = io.metadata.graph
    got_in, got_out = sorted(t.name for t in io.inputs), sorted(t.name for t in io.outputs)
    if got_in != sorted(graph.input_names) or got_out != sorted(graph.output_names):
        raise PromptsegError(f"{path}: tensors {got_in} -> {got_out} | expected {graph.input_names} -> "
                             f"{graph.output_names} for a {graph.kind} model")
    want = {t.name: t.dtype for t in (*graph.inputs, *graph.outputs)}
    for tensor in (*io.inputs, *io.outputs):
        if tensor.dtype != want[tensor.name]:
            raise PromptsegError(f"{path}: tensor {tensor.name!r} is {tensor.dtype} | expected {want[tensor.name]}")
