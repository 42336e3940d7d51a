"""TensorRT backend: build an engine from the (QDQ or FP32/FP16) ONNX, cache it, run it.

Written against TensorRT's documented Python API for 10.x (JetPack 6 ships 10.3) and 11.x, with
features detected rather than assumed:

- TensorRT 11 builds strongly typed networks only: no FP16/INT8 builder flags and no calibrators.
  INT8 comes from Q/DQ nodes in the ONNX, FP16 from an FP16-cast ONNX (e.g. modelopt AutoCast,
  LayerNorm/Softmax kept in FP32). TensorRT 10.x still has the flags, so it can also make FP16
  from an FP32 graph.
- Inference: ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on one stream,
  with pinned host buffers (:mod:`promptseg.runtime.cuda_memory`).

``tensorrt`` is imported only when this backend runs; without it every entry point raises a
:class:`PromptsegError` saying so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...errors import PromptsegError
from ...io import sha256_file, write_bytes_atomic
from ..cuda_memory import CudaApi, HostDeviceBuffer, load_cuda
from ..engine_cache import EngineCache, EngineKey, ShapeProfile, mismatches, read_manifest
from ..precision import check_precision, model_precision
from ..spec import MIN_SIDE, ModelMetadata, TensorSpec, read_metadata
from .base import BackendOptions, Bounds, InferenceError, ModelIO, Runner, format_shape

NOT_INSTALLED = ("tensorrt not installed: it ships with JetPack on a Jetson and as NVIDIA's wheels for desktop "
                 "GPUs (`pip install promptseg[tensorrt]`)")


def import_tensorrt():
    """The ``tensorrt`` module, at least 10.0 (I/O tensor API, int64 tensors), or a clear error."""
    try:
        import tensorrt as trt
    except ImportError:
        raise PromptsegError(NOT_INSTALLED) from None
    if _major(trt.__version__) < 10:
        raise PromptsegError(f"tensorrt {trt.__version__} | expected >= 10.0 (execute_async_v3, int64 outputs)")
    return trt


def _major(version: str) -> int:
    return int(version.split(".")[0])


# ----------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildPlan:
    """How to build for one precision: network typing, builder flags (``trt.BuilderFlag`` names), why."""

    strongly_typed: bool
    flags: tuple[str, ...]
    reason: str


def plan_build(precision: str, graph: str, tensorrt_version: str, precision_flags: bool) -> BuildPlan:
    """The build for ``precision`` of an ONNX whose own precision is ``graph``.

    ``precision_flags``: whether this TensorRT still has ``BuilderFlag.FP16``/``INT8`` (10.x yes,
    11 no). Raises before any expensive step when the ONNX cannot give the precision asked for.
    """
    check_precision(precision)
    check_precision(graph)
    if graph == "int8" and precision != "int8":
        raise PromptsegError(f"precision {precision}: the ONNX has Q/DQ nodes, which TensorRT runs as int8 | "
                             f"expected --precision int8 (or the unquantized ONNX)")
    if precision == "int8" and graph != "int8":
        raise PromptsegError(f"precision int8: the ONNX is {graph} with no Q/DQ nodes | expected a quantized "
                             f"(QDQ) ONNX: TensorRT >= 10 takes int8 from explicit quantization, promptseg uses "
                             f"no calibrator")
    if graph == "fp16" and precision == "fp32":
        raise PromptsegError("precision fp32: the ONNX is FP16-cast | expected --precision fp16 (or the FP32 ONNX)")
    if precision == graph == "int8" and precision_flags:
        # 10.x, weakly typed: Q/DQ layers run int8 and the layers left unquantized may use FP16,
        # as `trtexec --int8 --fp16` builds a QDQ model.
        return BuildPlan(False, ("INT8", "FP16"), "TensorRT 10.x: Q/DQ int8, FP16 allowed for unquantized layers")
    if precision == "fp16" and graph == "fp32":
        if not precision_flags:
            raise PromptsegError(f"precision fp16 with TensorRT {tensorrt_version}: strongly typed only, so FP16 "
                                 f"must be in the ONNX | got an fp32 graph; expected an FP16-cast ONNX (e.g. "
                                 f"modelopt AutoCast, keeping LayerNorm/Softmax in fp32)")
        return BuildPlan(False, ("FP16",), "TensorRT 10.x: FP16 builder flag on an fp32 graph")
    return BuildPlan(True, (), f"strongly typed: the ONNX's own {graph} types")


def network_flags(trt, plan: BuildPlan) -> int:
    """``create_network`` flags: STRONGLY_TYPED where the plan wants it and the enum still has it
    (TensorRT 11 networks are strongly typed whatever is passed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if plan.strongly_typed and flag is not None else 0


def default_profile(metadata: ModelMetadata, max_batch: int = 1, max_side: int = 1024) -> ShapeProfile:
    """Batch 1..``max_batch``, sides ``MIN_SIDE``..``max_side``, tuned for the metadata's input size
    at ``max_batch`` (what infer feeds: native sizes, downscaled to ``max_side``)."""
    h, w = metadata.input_size
    side = max(max_side, h, w)
    return ShapeProfile((1, 3, MIN_SIDE, MIN_SIDE), (max_batch, 3, h, w), (max_batch, 3, side, side)).validate()


def _parser_errors(parser) -> str:
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        errors.append(error.desc() if hasattr(error, "desc") else str(error))
    return "; ".join(errors) or "no error reported"


def engine_from_onnx(trt, onnx_path, plan: BuildPlan, profile: ShapeProfile, workspace_mib: int = 1024,
                     timing_cache: Path | None = None) -> bytes:
    """A serialized engine of ``onnx_path``; ``timing_cache`` (a file) is read if present and rewritten,
    so later builds on this device skip kernel timing."""
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise PromptsegError(f"{onnx_path}: TensorRT's ONNX parser failed: {_parser_errors(parser)}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != ["image"]:
        raise PromptsegError(f"{onnx_path}: inputs {names} | expected ['image'] (the profile covers that one)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape("image", profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: a cache from another device is an error, not ignored
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PromptsegError(f"{onnx_path}: TensorRT could not build an engine ({plan.reason}; profile "
                             f"{profile.describe()}); its log above says why")
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())
    return memoryview(serialized).tobytes()


def device_identity(cuda: CudaApi, trt) -> dict[str, str]:
    """The fields of an engine key that only this machine knows."""
    gpu, capability = cuda.device_info()
    return {"gpu": gpu, "compute_capability": capability, "tensorrt": trt.__version__}


def cached_engine(onnx_path, options: BackendOptions) -> tuple[Path, str]:
    """The engine of ``onnx_path`` for ``options``: the cached one when its key matches, else a new
    build stored in the cache. Returns the engine path and what happened."""
    onnx_path = Path(onnx_path)
    metadata = read_metadata(onnx_path)
    graph = model_precision(onnx_path)
    precision = options.precision or graph
    trt = import_tensorrt()
    plan = plan_build(precision, graph, trt.__version__, hasattr(trt.BuilderFlag, "FP16"))
    profile = (options.profile or default_profile(metadata, options.max_batch, options.max_side)).validate()
    if len(profile.min) != 4 or profile.min[1] != 3 or profile.max[1] != 3:
        raise PromptsegError(f"shape profile {profile.describe()} | expected N x 3 x H x W shapes for 'image'")
    cuda = load_cuda()
    try:
        identity = device_identity(cuda, trt)
    finally:
        cuda.close()
    key = EngineKey(precision=precision, profile=profile, onnx_sha256=sha256_file(onnx_path), **identity)
    cache = EngineCache(options.cache_dir or onnx_path.parent / "engines")
    path, reason = cache.lookup(key, onnx_path.stem)
    if path is not None:
        return path, reason
    timing = Path(options.timing_cache) if options.timing_cache else None
    engine = engine_from_onnx(trt, onnx_path, plan, profile, options.workspace_mib, timing)
    build = {"plan": asdict(plan), "workspace_mib": options.workspace_mib, "graph_precision": graph}
    try:
        return cache.store(key, onnx_path.stem, engine, metadata.to_props(), build), f"built ({reason})"
    except OSError as exc:  # a full or read-only cache must not cost the build (minutes on a Jetson)
        scratch = EngineCache(Path(tempfile.mkdtemp(prefix="promptseg-engine-")))
        path = scratch.store(key, onnx_path.stem, engine, metadata.to_props(), build)
        return path, f"built ({reason}); not cached: {cache.root} is not writable ({exc.strerror or exc}), " \
                     f"this run uses {path}"


# ----------------------------------------------------------------------------- run


class TrtRunner(Runner):
    """A TensorRT engine: from a ``.engine`` built by ``promptseg build-engine`` (its manifest beside
    it), or from an ONNX file through the engine cache (built on first use)."""

    backend = "tensorrt"

    def __init__(self, model_path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path)
        self.options = (options or BackendOptions()).validate()
        self.engine_path: Path | None = None
        self.cache_note = ""
        self._precision = ""
        self._cuda: CudaApi | None = None
        self._engine = self._context = self._runtime = None
        self._stream: int | None = None
        self._buffers: dict[str, HostDeviceBuffer] = {}
        self._bounds: dict[str, Bounds] = {}
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def _activate(self) -> ModelIO:
        trt = import_tensorrt()
        if self.model_path.suffix == ".onnx":
            self.engine_path, self.cache_note = cached_engine(self.model_path, self.options)
        else:
            self.engine_path = self.model_path
        manifest = read_manifest(self.engine_path)
        if manifest is None:
            raise PromptsegError(f"{self.engine_path}: no readable {self.engine_path.name}.json beside it | "
                                 f"expected an engine built by `promptseg build-engine`")
        try:
            self._cuda = load_cuda()
            here = device_identity(self._cuda, trt)
            diff = mismatches(manifest["key"], here)
            if diff:
                raise PromptsegError(f"{self.engine_path}: built for another GPU or TensorRT ({'; '.join(diff)}) | "
                                     f"rebuild it here with `promptseg build-engine`")
            self._precision = manifest["key"]["precision"]
            metadata = ModelMetadata.from_props(manifest["metadata"], source=str(self.engine_path))
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self._engine is None:
                raise PromptsegError(f"{self.engine_path}: TensorRT could not deserialize the engine")
            self._context = self._engine.create_execution_context()
            self._stream = self._cuda.stream_create()
            self._inputs, self._outputs = self._read_io(trt, metadata)
        except BaseException:
            self._deactivate()
            raise
        return ModelIO(metadata, self._inputs, self._outputs)

    def _read_io(self, trt, metadata: ModelMetadata) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The engine's I/O tensors; dynamic dims take their names from the graph spec."""
        named = {t.name: t.shape for t in (*metadata.graph.inputs, *metadata.graph.outputs)}
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dims = tuple(self._engine.get_tensor_shape(name))
            spec_dims = named.get(name, ("?",) * len(dims))
            shape = tuple(d if d >= 0 else (s if isinstance(s, str) else "?") for d, s in zip(dims, spec_dims,
                                                                                              strict=False))
            spec = TensorSpec(name, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))).name, shape)
            self._buffers[name] = HostDeviceBuffer(self._cuda)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                self._bounds[name] = (tuple(low), tuple(high))
                inputs.append(spec)
            else:
                outputs.append(spec)
        return tuple(inputs), tuple(outputs)

    @property
    def precision(self) -> str:
        """The precision the engine was built for (its manifest's key)."""
        return self._precision

    def shape_bounds(self, name: str) -> Bounds | None:
        return self._bounds.get(name)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, self._context, self._stream
        for spec in self._inputs:
            array = feed[spec.name]
            if not context.set_input_shape(spec.name, array.shape):
                raise InferenceError(f"{self.name}: TensorRT refused input {spec.name!r} of shape "
                                     f"{format_shape(array.shape)}")
            buffer = self._buffers[spec.name]
            buffer.ensure(array.nbytes)
            staged = buffer.host_view(array.dtype, array.shape)
            np.copyto(staged, array)
            cuda.memcpy_htod_async(buffer.device, staged, stream)
            context.set_tensor_address(spec.name, buffer.device)
        results = {}
        for spec in self._outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if min(shape, default=0) < 0:
                raise InferenceError(f"{self.name}: output {spec.name!r} has unresolved shape {format_shape(shape)}")
            buffer = self._buffers[spec.name]
            buffer.ensure(max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize))
            results[spec.name] = buffer.host_view(np.dtype(spec.dtype), shape)
            context.set_tensor_address(spec.name, buffer.device)
        if not context.execute_async_v3(stream):
            raise InferenceError(f"{self.name}: execute_async_v3 failed on "
                                 f"{', '.join(f'{k} {format_shape(v.shape)}' for k, v in feed.items())}")
        for spec in self._outputs:
            cuda.memcpy_dtoh_async(results[spec.name], self._buffers[spec.name].device, stream)
        cuda.stream_synchronize(stream)
        return {name: view.copy() for name, view in results.items()}  # the pinned buffers are reused

    def _deactivate(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers, self._bounds = {}, {}
        if self._stream is not None:
            self._cuda.stream_destroy(self._stream)
            self._stream = None
        self._context = self._engine = self._runtime = None  # context before engine before runtime
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
