"""OpenVINO backend: the exported ONNX compiled by OpenVINO's CPU plugin, the runtime of Intel CPUs
in industrial PCs and NUCs (oneDNN kernels: AVX2 everywhere, VNNI/AMX int8 and AVX-512 BF16/AMX bf16
where the CPU has them).

- The ONNX is read as it is (OpenVINO's ONNX frontend): batch, height and width stay dynamic, and
  the metadata and graph precision come from the file, as for the other backends.
- Precision ``fp32``: compute in f32. ``bf16``: the fp32 graph computed in bf16, only where the CPU
  lists BF16 among its optimisation capabilities; elsewhere it runs fp32 and says so (OpenVINO
  itself ignores a bf16 hint on such a CPU without a word). ``int8``: a Q/DQ ONNX (``promptseg
  calibrate`` writes one, from ONNX Runtime's quantizer or NNCF's), whose quantized layers
  OpenVINO runs in int8.
- The precision a runner reports is read back from the compiled model's runtime graph (what its
  convolutions really run at), never taken from the request.

``openvino`` is imported only when this backend runs (``pip install promptseg[openvino]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import PromptsegError
from ..precision import check_precision, model_precision
from ..spec import ModelMetadata, TensorSpec, read_metadata
from .base import BackendOptions, InferenceError, ModelIO, Runner, format_shape

NOT_INSTALLED = ("openvino not installed: `pip install promptseg[openvino]` (Intel's CPU runtime; runs on any "
                 "x86-64 CPU, bf16 where it has AVX-512 BF16 or AMX)")
PRECISIONS = ("fp32", "bf16", "int8")
# the runtime graph's layer types that do the arithmetic: their precision is the model's
COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "MatMul", "FullyConnected"})
# runtime precisions, most reduced first: one int8 convolution makes an int8 model
_RUNTIME_PRECISIONS = (("u8", "int8"), ("i8", "int8"), ("bf16", "bf16"), ("f16", "fp16"))


def import_openvino():
    """The ``openvino`` module, or a clear error."""
    try:
        import openvino
    except ImportError:
        raise PromptsegError(NOT_INSTALLED) from None
    return openvino


def cpu_capabilities(core) -> tuple[str, ...]:
    """``OPTIMIZATION_CAPABILITIES`` of OpenVINO's CPU plugin (``BF16`` where the CPU has bf16 units)."""
    return tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@dataclass(frozen=True)
class CompilePlan:
    """What to compile for: the precision expected to run, OpenVINO's ``INFERENCE_PRECISION_HINT``
    (for an int8 graph: of the layers left in float), and why it differs from the request ("" if not)."""

    precision: str
    hint: str
    note: str = ""


def plan_compile(requested: str | None, graph: str, capabilities: Sequence[str]) -> CompilePlan:
    """The compile plan for ``requested`` (None: the graph's own) of an ONNX whose precision is ``graph``.

    Raises before any compile when the ONNX cannot give the precision asked for; bf16 on a CPU
    without bf16 units is a plan for fp32 with a note saying so.
    """
    check_precision(graph)
    if graph == "fp16":
        raise PromptsegError("the ONNX is FP16-cast | expected the FP32 ONNX: OpenVINO chooses the CPU's compute "
                             "precision itself (--precision fp32 or bf16)")
    precision = check_precision(requested or graph, PRECISIONS, " (OpenVINO on the CPU)")
    if graph == "int8" and precision != "int8":
        raise PromptsegError(f"precision {precision}: the ONNX has Q/DQ nodes, which OpenVINO runs as int8 | "
                             f"expected --precision int8 (or the unquantized ONNX)")
    if precision == "int8" and graph != "int8":
        raise PromptsegError(f"precision int8: the ONNX is {graph} with no Q/DQ nodes | expected a quantized (QDQ) "
                             f"ONNX, as `promptseg calibrate --target cpu` writes")
    has_bf16 = "BF16" in capabilities
    if precision == "int8":  # the layers left in float run as fast as the CPU allows
        return CompilePlan("int8", "bf16" if has_bf16 else "f32",
                           "Q/DQ layers int8, the float layers bf16" if has_bf16 else "")
    if precision == "bf16" and not has_bf16:
        return CompilePlan("fp32", "f32", f"bf16 asked for, but this CPU has no bf16 units (OpenVINO CPU "
                                          f"capabilities: {', '.join(capabilities)}): ran fp32")
    return CompilePlan(precision, {"fp32": "f32", "bf16": "bf16"}[precision])


def runtime_precision(compiled) -> str:
    """``int8``/``bf16``/``fp16``/``fp32``: what the compiled model's compute layers really run at."""
    found = set()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE_LAYERS:
            found.add(info["runtimePrecision"].astype(str))
    return next((name for element, name in _RUNTIME_PRECISIONS if element in found), "fp32")


def _message(exc: BaseException) -> str:
    """OpenVINO's reason without its source locations (``Exception from src/...``, ``Check '...' failed``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return " ".join(reason or lines[:1])[:300]


def compile_config(plan: CompilePlan, threads: int | None) -> dict[str, object]:
    """``compile_model`` properties: one stream for latency (infer runs one batch at a time)."""
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": plan.hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenvinoRunner(Runner):
    """A promptseg ONNX file compiled by OpenVINO for the CPU."""

    backend = "openvino"

    def __init__(self, model_path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path)
        self.options = (options or BackendOptions()).validate()
        self.plan: CompilePlan | None = None
        self._precision = ""
        self._note = ""
        self._compiled = self._request = None
        self._outputs: list[tuple[str, object]] = []  # (name, compiled output port)

    def _activate(self) -> ModelIO:
        ov = import_openvino()
        core = ov.Core()
        try:
            model = core.read_model(str(self.model_path))
        except RuntimeError as exc:
            raise PromptsegError(f"{self.model_path}: OpenVINO cannot read it ({_message(exc)})") from None
        metadata = read_metadata(self.model_path)
        self.plan = plan_compile(self.options.precision, model_precision(self.model_path), cpu_capabilities(core))
        try:
            self._compiled = core.compile_model(model, "CPU", compile_config(self.plan, self.options.threads))
        except RuntimeError as exc:
            raise PromptsegError(f"{self.model_path}: OpenVINO could not compile it ({_message(exc)})") from None
        self._request = self._compiled.create_infer_request()
        self._precision = runtime_precision(self._compiled)
        notes = [self.plan.note] if self.plan.note else []
        if self._precision != self.plan.precision:
            notes.append(f"OpenVINO ran {self._precision} where {self.plan.precision} was planned")
        self._note = "; ".join(notes)
        inputs = tuple(_tensor_spec(port, metadata) for port in self._compiled.inputs)
        outputs = tuple(_tensor_spec(port, metadata) for port in self._compiled.outputs)
        self._outputs = [(t.name, port) for t, port in zip(outputs, self._compiled.outputs, strict=True)]
        return ModelIO(metadata, inputs, outputs)

    @property
    def precision(self) -> str:
        """What the compiled model's convolutions run at (read back from its runtime graph)."""
        return self._precision

    @property
    def precision_note(self) -> str:
        return self._note

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._request.infer(dict(feed), share_inputs=True)  # outputs are copies
        except RuntimeError as exc:
            shapes = ", ".join(f"{k} {format_shape(v.shape)}" for k, v in feed.items())
            raise InferenceError(f"{self.name}: OpenVINO failed on {shapes} ({_message(exc)})") from None
        return {name: results[port] for name, port in self._outputs}

    def _deactivate(self) -> None:
        self._request = self._compiled = None


def _tensor_spec(port, metadata: ModelMetadata) -> TensorSpec:
    """A compiled model's input or output; dynamic dims take their names from the graph spec."""
    named = {t.name: t.shape for t in (*metadata.graph.inputs, *metadata.graph.outputs)}
    # a port fused with the op before it carries that op's tensor name too ({'flat', 'scores'}): the
    # spec's name is the graph's own; anything else (a renamed output) is for the graph check to refuse
    matches = sorted(set(port.get_names()) & set(named))
    name = matches[0] if len(matches) == 1 else port.get_any_name()
    dims = list(port.get_partial_shape())
    spec_dims = named.get(name, ("?",) * len(dims))
    shape = tuple(d.get_length() if d.is_static else (s if isinstance(s, str) else "?")
                  for d, s in zip(dims, spec_dims, strict=False))
    return TensorSpec(name, np.dtype(port.get_element_type().to_dtype()).name, shape)
