"""The TensorRT backend's own logic, which needs no GPU: build plans per TensorRT version, the engine
cache key and its rebuild decision, shape profiles, and the CUDA memory module's errors.

TensorRT cannot be installed here (PyPI's ``tensorrt`` packages are download stubs that fetch
NVIDIA's wheels at install time), so the runner is also driven through a fake ``tensorrt`` module
and a numpy "device": that checks our bookkeeping against the documented API (shapes set,
addresses bound, copies sized, engines cached and rebuilt), not TensorRT itself. The real-GPU test
at the end skips with the reason when ``tensorrt`` is missing.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_runtime_models import tiny_segmenter

import promptseg.runtime.backends.tensorrt as trt_backend
from promptseg.errors import PromptsegError
from promptseg.runtime.backends import BackendOptions, open_runner
from promptseg.runtime.backends.base import InferenceError
from promptseg.runtime.backends.tensorrt import BuildPlan, default_profile, network_flags, plan_build
from promptseg.runtime.cuda_memory import CudaApi, CudaError, HostDeviceBuffer, load_cuda
from promptseg.runtime.engine_cache import (
    EngineCache,
    EngineKey,
    ShapeProfile,
    cache_decision,
    manifest_path,
    parse_shape,
    read_manifest,
)
from promptseg.runtime.precision import precision_of
from promptseg.runtime.spec import read_metadata

PROFILE = ShapeProfile((1, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64))

# ----------------------------------------------------------------------------- build plans


@pytest.mark.parametrize(("precision", "graph", "version", "flags", "plan"), [
    ("fp32", "fp32", "10.3.0", True, BuildPlan(True, (), "strongly typed: the ONNX's own fp32 types")),
    ("fp32", "fp32", "11.0.0", False, BuildPlan(True, (), "strongly typed: the ONNX's own fp32 types")),
    ("fp16", "fp32", "10.3.0", True, BuildPlan(False, ("FP16",), "TensorRT 10.x: FP16 builder flag on an fp32 graph")),
    ("fp16", "fp16", "11.0.0", False, BuildPlan(True, (), "strongly typed: the ONNX's own fp16 types")),
    ("fp16", "fp16", "10.3.0", True, BuildPlan(True, (), "strongly typed: the ONNX's own fp16 types")),
    ("int8", "int8", "10.3.0", True, BuildPlan(False, ("INT8", "FP16"),
                                               "TensorRT 10.x: Q/DQ int8, FP16 allowed for unquantized layers")),
    ("int8", "int8", "11.0.0", False, BuildPlan(True, (), "strongly typed: the ONNX's own int8 types")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_build_plan_per_tensorrt_generation(precision, graph, version, flags, plan):
    assert plan_build(precision, graph, version, flags) == plan


@pytest.mark.parametrize(("precision", "graph", "version", "flags", "match"), [
    ("fp16", "fp32", "11.0.0", False, r"precision fp16 with TensorRT 11.0.0: strongly typed only.* modelopt AutoCast"),
    ("int8", "fp32", "10.3.0", True, r"precision int8: the ONNX is fp32 with no Q/DQ nodes"),
    ("int8", "fp16", "11.0.0", False, r"precision int8: the ONNX is fp16"),
    ("fp32", "int8", "10.3.0", True, r"precision fp32: the ONNX has Q/DQ nodes.* expected --precision int8"),
    ("fp16", "int8", "11.0.0", False, r"precision fp16: the ONNX has Q/DQ nodes"),
    ("fp32", "fp16", "10.3.0", True, r"precision fp32: the ONNX is FP16-cast"),
    ("bf16", "fp32", "10.3.0", True, r"precision: got 'bf16' \| expected one of fp32, fp16, int8"),
])
def test_build_plan_refuses_what_the_onnx_cannot_give(precision, graph, version, flags, match):
    with pytest.raises(PromptsegError, match=match):
        plan_build(precision, graph, version, flags)


def test_network_flags_follow_the_enum_that_exists():
    with_flag = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    without = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert network_flags(with_flag, BuildPlan(True, (), "")) == 2
    assert network_flags(with_flag, BuildPlan(False, ("FP16",), "")) == 0
    assert network_flags(without, BuildPlan(True, (), "")) == 0  # TensorRT 11: strongly typed by default


# ----------------------------------------------------------------------------- shapes and cache keys


def test_shapes_parse_like_trtexec_and_profiles_validate():
    assert parse_shape("1x3x64x64") == parse_shape("image:1x3x64x64") == (1, 3, 64, 64)
    for text, match in [("1x3x64", None), ("logits:1x3x8x8", "input 'logits'"), ("1,3,8,8", "dims joined by x"),
                        ("0x3x8x8", "a dim below 1")]:
        if match:
            with pytest.raises(PromptsegError, match=match):
                parse_shape(text)
    with pytest.raises(PromptsegError, match=r"1x3x64x64 / 1x3x32x32 / 1x3x64x64 \| expected min <= opt <= max"):
        ShapeProfile((1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 64, 64)).validate()


def test_default_profile_covers_native_sizes_up_to_max_side(tmp_path):
    meta = read_metadata(tiny_segmenter(tmp_path / "m.onnx"))
    assert default_profile(meta, max_batch=4, max_side=512) == ShapeProfile((1, 3, 16, 16), (4, 3, 32, 32),
                                                                            (4, 3, 512, 512))


def _key(**changes) -> EngineKey:
    fields = dict(gpu="Orin", compute_capability="8.7", tensorrt="10.3.0", precision="int8", profile=PROFILE,
                  onnx_sha256="ab" * 32)
    return EngineKey(**{**fields, **changes})


def test_engine_key_digest_changes_with_every_field():
    base = _key()
    assert base.digest == _key().digest and base.filename("seg").startswith("seg.int8.")
    others = [_key(gpu="RTX 4090"), _key(compute_capability="8.9"), _key(tensorrt="10.4.0"), _key(precision="fp16"),
              _key(profile=ShapeProfile((1, 3, 16, 16), (1, 3, 32, 32), (2, 3, 64, 64))), _key(onnx_sha256="cd" * 32)]
    assert len({base.digest, *(k.digest for k in others)}) == 7


def test_cache_decision_loads_only_a_matching_engine():
    key = _key()
    manifest = {"key": key.to_json(), "engine_sha256": "e1"}
    assert cache_decision(manifest, key, "e1") == (True, "cached engine matches")
    assert cache_decision(manifest, key, None) == (False, "no cached engine")
    assert cache_decision(None, key, "e1") == (False, "cached engine has no readable manifest")
    load, reason = cache_decision(manifest, _key(tensorrt="10.4.0"), "e1")
    assert not load and reason == "cached engine does not match: tensorrt: cached '10.3.0' | now '10.4.0'"
    assert cache_decision(manifest, key, "e2") == (False, "cached engine's bytes differ from its manifest")


def test_engine_cache_stores_finds_and_rejects_tampered_engines(tmp_path):
    cache, key = EngineCache(tmp_path), _key()
    assert cache.lookup(key, "seg") == (None, "no cached engine")
    path = cache.store(key, "seg", b"engine-bytes", {"promptseg.kind": '"segmenter"'}, {"plan": "x"})
    assert cache.lookup(key, "seg") == (path, "cached engine matches")
    assert precision_of(path) == "int8"
    assert cache.lookup(_key(onnx_sha256="cd" * 32), "seg") == (None, "no cached engine")  # another ONNX, another file
    path.write_bytes(b"other-bytes")
    assert cache.lookup(key, "seg") == (None, "cached engine's bytes differ from its manifest")
    manifest_path(path).write_text("{")
    assert cache.lookup(key, "seg") == (None, "cached engine has no readable manifest")


# ----------------------------------------------------------------------------- CUDA memory


def test_no_cuda_binding_is_a_clear_error(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(PromptsegError, match="no CUDA binding installed | expected cuda-python .* or pycuda"):
        load_cuda()


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python not installed")
def test_cuda_python_errors_name_the_call_when_there_is_no_gpu():
    try:
        api = load_cuda()
    except CudaError as exc:  # no driver or no device here: the binding's error, named
        assert str(exc).startswith("CUDA cudaSetDevice: cudaError")
    else:
        name, capability = api.device_info()
        assert name and capability.count(".") == 1


class NumpyCuda(CudaApi):
    """A "device" of numpy arrays keyed by fake pointers; copies are real, so misbound addresses,
    wrong sizes or missed copies show up as wrong outputs."""

    name = "numpy"

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.host_live = 0
        self._next = 4096
        self.pending: list = []  # work queued on the stream: it happens at stream_synchronize, as on a GPU

    def device_info(self):
        return "Fake GPU", "8.7"

    def malloc(self, nbytes):
        self._next += 4096 + nbytes
        self.memory[self._next] = np.zeros(nbytes, np.uint8)
        return self._next

    def free(self, ptr):
        del self.memory[ptr]

    def malloc_host(self, nbytes):
        self.host_live += 1
        return np.zeros(nbytes, np.uint8)

    def free_host(self, array):
        self.host_live -= 1

    def stream_create(self):
        return 7

    def stream_synchronize(self, stream):
        assert stream == 7
        while self.pending:
            self.pending.pop(0)()

    def stream_destroy(self, stream):
        assert stream == 7

    def memcpy_htod_async(self, dst, src, stream):
        def copy():
            self.memory[dst][: src.nbytes] = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        self.pending.append(copy)

    def memcpy_dtoh_async(self, dst, src, stream):
        def copy():
            dst.view(np.uint8).reshape(-1)[:] = self.memory[src][: dst.nbytes]
        self.pending.append(copy)

    def close(self):
        pass


def test_host_device_buffer_grows_and_frees():
    cuda = NumpyCuda()
    buffer = HostDeviceBuffer(cuda)
    buffer.ensure(64)
    first = buffer.device
    buffer.ensure(32)
    assert buffer.device == first and buffer.capacity == 64
    buffer.ensure(128)
    assert buffer.device != first and list(cuda.memory) == [buffer.device] and cuda.host_live == 1
    assert buffer.host_view(np.float32, (2, 4)).shape == (2, 4)
    buffer.free()
    assert cuda.memory == {} and cuda.host_live == 0


def test_a_failed_pinned_allocation_gives_the_device_memory_back():
    cuda = NumpyCuda()
    buffer = HostDeviceBuffer(cuda)
    buffer.ensure(64)

    def no_pinned_memory(nbytes):
        raise CudaError("CUDA cudaMallocHost: cudaErrorMemoryAllocation")

    cuda.malloc_host = no_pinned_memory
    with pytest.raises(CudaError, match="cudaMallocHost"):
        buffer.ensure(1 << 20)
    assert cuda.memory == {} and buffer.capacity == 0  # neither the old nor the new device buffer is left
    buffer.free()  # and freeing again is harmless


# ----------------------------------------------------------------------------- a fake tensorrt


class _Enum(types.SimpleNamespace):
    pass


def fake_tensorrt(version: str, cuda: NumpyCuda) -> types.ModuleType:
    """The subset of ``tensorrt`` the backend calls. A "serialized engine" is the ONNX bytes and the
    profile; "executing" it runs ONNX Runtime on the bytes found at the bound device addresses."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []
    trt.fail = set()  # what the fake refuses, on request: parse, build, deserialize, shape, execute
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.BuilderFlag = _Enum(FP16=0, INT8=1) if version.startswith("10.") else _Enum()
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = _Enum(WORKSPACE="workspace")
    trt.TensorIOMode = _Enum(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.onnx = flags, b""
            self.num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="image")

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.onnx = Path(path).read_bytes()
            if "parse" in trt.fail:
                self.num_errors = 1
                return False
            return True

        def get_error(self, i):
            return types.SimpleNamespace(desc=lambda: "Unsupported operator: FakeOp")

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool = [], [], {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing" + self.timing)

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            if "build" in trt.fail:
                return None
            trt.builds.append({"network_flags": network.flags, "flags": config.flags, "pool": config.pool,
                               "profile": config.profiles[0]["image"]})
            return pickle.dumps((network.onnx, config.profiles[0]["image"]))

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            if "shape" in trt.fail:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n, _, h, w = self.shapes["image"]
            sizes = {"batch": n, "height": h, "width": w}
            return [sizes.get(d, d) for d in self.engine.dims[name]]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            if "execute" in trt.fail:
                return False
            shape, addresses = self.shapes["image"], dict(self.addresses)

            def run():  # on the stream: after the queued input copies, before the output copies
                x = cuda.memory[addresses["image"]][: int(np.prod(shape)) * 4].view(np.float32).reshape(shape)
                outputs = self.engine.session.run(["logits", "labels"], {"image": x})
                for out, value in zip(["logits", "labels"], outputs, strict=True):
                    cuda.memory[addresses[out]][: value.nbytes] = value.view(np.uint8).reshape(-1)
            cuda.pending.append(run)
            return True

    class Engine:
        def __init__(self, data):
            onnx_bytes, self.profile = pickle.loads(data)
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.dims = {a.name: list(a.shape) for a in (*self.session.get_inputs(), *self.session.get_outputs())}
            self.names = list(self.dims)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "image" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return np.int64 if name == "labels" else np.float32

        def get_tensor_shape(self, name):
            return [d if isinstance(d, int) else -1 for d in self.dims[name]]

        def get_tensor_profile_shape(self, name, index):
            return self.profile

        def create_execution_context(self):
            return Context(self)

    trt.Builder = Builder
    trt.OnnxParser = Parser
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: None if "deserialize" in trt.fail else Engine(data))
    return trt


@pytest.fixture()
def fake_device(monkeypatch):
    cuda = NumpyCuda()
    monkeypatch.setattr(trt_backend, "load_cuda", lambda: cuda)

    def install(version: str):
        trt = fake_tensorrt(version, cuda)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return cuda, install


def test_fake_tensorrt_runner_matches_onnxruntime_and_caches_its_engine(fake_device, tmp_path):
    cuda, install = fake_device
    trt = install("10.3.0")
    model = tiny_segmenter(tmp_path / "seg.onnx", "int8")
    options = BackendOptions(max_batch=2, max_side=64, timing_cache=str(tmp_path / "timing.cache"))
    x = np.random.default_rng(0).random((2, 3, 24, 40), dtype=np.float32)
    with open_runner(model, "onnxruntime") as reference:
        expected = reference.infer({"image": x})
    with open_runner(model, "tensorrt", options) as runner:
        assert runner.precision == "int8" and runner.cache_note.startswith("built (no cached engine)")
        got = runner.infer({"image": x})
        small = runner.infer({"image": x[:1, :, :16, :16]})  # buffers stay, shapes change
        with pytest.raises(PromptsegError, match=r"got shape \(2, 3, 80, 80\) \| expected \(1\.\.2, 3, 16\.\.64, "
                                                 r"16\.\.64\)"):
            runner.infer({"image": np.zeros((2, 3, 80, 80), np.float32)})
        assert [t.shape for t in runner.input_specs()] == [("batch", 3, "height", "width")]
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=0, atol=0)
    assert small["labels"].shape == (1, 16, 16)
    assert cuda.memory == {} and cuda.host_live == 0  # deactivation freed every buffer
    assert trt.builds == [{"network_flags": 0, "flags": [1, 0], "pool": {"workspace": 1024 << 20},
                           "profile": ((1, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64))}]
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"
    with open_runner(model, "tensorrt", options) as runner:
        assert runner.cache_note == "cached engine matches"
    assert len(trt.builds) == 1
    engine = runner.engine_path
    with open_runner(engine, "tensorrt") as direct:  # a built .engine runs by itself, metadata from its manifest
        assert direct.metadata == read_metadata(model)
    trt = install("11.0.0")  # a new TensorRT: another key, so a new build, never the old engine
    with open_runner(model, "tensorrt", options) as runner:
        assert runner.engine_path != engine and runner.cache_note.startswith("built")
    assert trt.builds[0]["flags"] == [] and trt.builds[0]["network_flags"] == 1 << 5
    with pytest.raises(PromptsegError, match=r"built for another GPU or TensorRT \(tensorrt: cached '10.3.0' \| "
                                             r"now '11.0.0'\)"):
        open_runner(engine, "tensorrt").activate()


@pytest.mark.parametrize("failure, error, match", [
    ("parse", PromptsegError, "TensorRT's ONNX parser failed: Unsupported operator: FakeOp"),
    ("build", PromptsegError, r"TensorRT could not build an engine \(.*profile 1x3x16x16"),
    ("deserialize", PromptsegError, "TensorRT could not deserialize the engine"),
    ("shape", InferenceError, r"TensorRT refused input 'image' of shape \(1, 3, 24, 24\)"),
    ("execute", InferenceError, r"execute_async_v3 failed on image \(1, 3, 24, 24\)"),
])
def test_fake_tensorrt_failures_are_named_and_free_every_buffer(fake_device, tmp_path, failure, error, match):
    cuda, install = fake_device
    trt = install("10.3.0")
    model = tiny_segmenter(tmp_path / "seg.onnx")
    trt.fail.add(failure)
    x = np.zeros((1, 3, 24, 24), np.float32)
    with pytest.raises(error, match=match):
        with open_runner(model, "tensorrt", BackendOptions(max_batch=1, max_side=64)) as runner:
            runner.infer({"image": x})
    assert cuda.memory == {} and cuda.host_live == 0
    if failure in ("parse", "build"):
        assert not list((tmp_path / "engines").glob("*.engine"))  # nothing half-built is cached


def test_fake_tensorrt_rebuilds_when_the_onnx_at_the_same_path_changes(fake_device, tmp_path):
    _, install = fake_device
    trt = install("10.3.0")
    model = tiny_segmenter(tmp_path / "seg.onnx", seed=0)
    x = np.random.default_rng(1).random((1, 3, 24, 24), dtype=np.float32)
    options = BackendOptions(max_batch=1, max_side=64)
    with open_runner(model, "tensorrt", options) as runner:
        first = runner.infer({"image": x})["logits"]
    tiny_segmenter(model, seed=1)  # a retrained model exported over the old file
    with open_runner(model, "onnxruntime") as reference:
        expected = reference.infer({"image": x})["logits"]
    with open_runner(model, "tensorrt", options) as runner:
        assert runner.cache_note.startswith("built (no cached engine)"), runner.cache_note
        got = runner.infer({"image": x})["logits"]
    assert len(trt.builds) == 2 and not np.allclose(first, expected)
    np.testing.assert_array_equal(got, expected)  # the new model's outputs, not the stale engine's


def test_an_unwritable_engine_cache_keeps_the_built_engine_for_the_run(fake_device, tmp_path, monkeypatch):
    from promptseg.runtime import engine_cache

    _, install = fake_device
    trt = install("10.3.0")
    model = tiny_segmenter(tmp_path / "seg.onnx")
    cache_dir = tmp_path / "engines"
    real_store = engine_cache.EngineCache.store

    def store(self, *args):
        if self.root == cache_dir:
            raise OSError(28, "No space left on device")
        return real_store(self, *args)

    monkeypatch.setattr(engine_cache.EngineCache, "store", store)
    x = np.random.default_rng(2).random((1, 3, 24, 24), dtype=np.float32)
    with open_runner(model, "onnxruntime") as reference:
        expected = reference.infer({"image": x})["labels"]
    with open_runner(model, "tensorrt", BackendOptions(max_batch=1, max_side=64, cache_dir=str(cache_dir))) as runner:
        assert "not cached" in runner.cache_note and "No space left on device" in runner.cache_note
        np.testing.assert_array_equal(runner.infer({"image": x})["labels"], expected)
    assert len(trt.builds) == 1 and not cache_dir.exists()


def test_fake_tensorrt_11_refuses_fp16_from_an_fp32_graph(fake_device, tmp_path):
    _, install = fake_device
    trt = install("11.0.0")
    model = tiny_segmenter(tmp_path / "seg.onnx")
    with pytest.raises(PromptsegError, match="strongly typed only, so FP16 must be in the ONNX"):
        open_runner(model, "tensorrt", BackendOptions(precision="fp16")).activate()
    assert trt.builds == []


# ----------------------------------------------------------------------------- the real thing


def test_real_tensorrt_engine_agrees_with_onnxruntime(tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed: PyPI's packages are download stubs here; JetPack or NVIDIA's wheels "
                    "provide it on a GPU machine")
    try:
        load_cuda().close()
    except PromptsegError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    model = tiny_segmenter(tmp_path / "seg.onnx")
    x = np.random.default_rng(0).random((1, 3, 32, 48), dtype=np.float32)
    with open_runner(model) as reference, open_runner(model, "tensorrt", BackendOptions(max_side=64)) as runner:
        expected, got = reference.infer({"image": x}), runner.infer({"image": x})
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-3)
    assert (got["labels"] == expected["labels"]).mean() > 0.99


@pytest.mark.parametrize("content", [b'{"key": \xff}', b"[1, 2]", b'{"engine_sha256": "ab"}', b'{"key": {}}'])
def test_an_unreadable_manifest_means_rebuild_not_a_crash(tmp_path, content):
    engine = tmp_path / "model.fp32.abc.engine"
    engine.write_bytes(b"engine bytes")
    manifest_path(engine).write_bytes(content)
    assert read_manifest(engine) is None
    with pytest.raises(PromptsegError, match="no readable model.fp32.abc.engine.json"):
        precision_of(engine)
