"""Device buffers, pinned host buffers and streams for the TensorRT backend, behind one small API.

Two implementations, chosen by what is installed: cuda-python (``cuda.bindings.runtime``, or the
older ``cuda.cudart``) first, then pycuda. Both work in the CUDA runtime's primary context, the
one TensorRT uses. Nothing here is imported unless the TensorRT backend runs.
"""

from __future__ import annotations

import abc
import ctypes

import numpy as np

from ..errors import PromptsegError


class CudaError(PromptsegError):
    """A CUDA call failed; the message names the call and CUDA's error."""


class CudaApi(abc.ABC):
    """What the TensorRT runner needs from CUDA. Pointers and stream handles are plain ints."""

    name = "none"

    @abc.abstractmethod
    def device_info(self) -> tuple[str, str]:
        """``(GPU name, compute capability "major.minor")`` of the current device."""

    @abc.abstractmethod
    def malloc(self, nbytes: int) -> int: ...

    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def malloc_host(self, nbytes: int) -> np.ndarray:
        """Pinned (page-locked) host memory as a flat uint8 array; :meth:`free_host` releases it."""

    @abc.abstractmethod
    def free_host(self, array: np.ndarray) -> None: ...

    @abc.abstractmethod
    def stream_create(self) -> int: ...

    @abc.abstractmethod
    def stream_synchronize(self, stream: int) -> None: ...

    @abc.abstractmethod
    def stream_destroy(self, stream: int) -> None: ...

    @abc.abstractmethod
    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None: ...

    @abc.abstractmethod
    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the API object itself holds (pycuda's pushed context)."""


class _CudaPython(CudaApi):
    name = "cuda-python"

    def __init__(self, cudart) -> None:
        self._rt = cudart
        self._pinned: dict[int, int] = {}  # id(array) -> pointer, for free_host

    def _call(self, what: str, result):
        """cuda-python returns ``(error, *values)``; raise on error, return the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            _, name = self._rt.cudaGetErrorName(err)
            raise CudaError(f"CUDA {what}: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_info(self) -> tuple[str, str]:
        device = self._call("cudaGetDevice", self._rt.cudaGetDevice())
        props = self._call("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties(device))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self._rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self._rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> np.ndarray:
        ptr = int(self._call("cudaMallocHost", self._rt.cudaMallocHost(nbytes)))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        self._pinned[id(array)] = ptr
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._call("cudaFreeHost", self._rt.cudaFreeHost(self._pinned.pop(id(array))))

    def stream_create(self) -> int:
        return int(self._call("cudaStreamCreate", self._rt.cudaStreamCreate()))

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", self._rt.cudaStreamDestroy(stream))

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def close(self) -> None:
        """Nothing to release: the runtime API owns its primary context."""


class _PyCuda(CudaApi):
    name = "pycuda"

    def __init__(self, driver, device: int = 0) -> None:
        self._drv = driver
        driver.init()
        self._device = driver.Device(device)
        # The primary context is the one the CUDA runtime (and so TensorRT) uses; a context of our
        # own would make TensorRT's pointers invalid here.
        self._context = self._device.retain_primary_context()
        self._context.push()
        self._allocations: dict[int, object] = {}
        self._streams: dict[int, object] = {}

    def device_info(self) -> tuple[str, str]:
        major, minor = self._device.compute_capability()
        return self._device.name(), f"{major}.{minor}"

    def malloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(nbytes)
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def malloc_host(self, nbytes: int) -> np.ndarray:
        return self._drv.pagelocked_empty(nbytes, np.uint8)

    def free_host(self, array: np.ndarray) -> None:
        array.base.free()

    def stream_create(self) -> int:
        stream = self._drv.Stream()
        self._streams[stream.handle] = stream
        return stream.handle

    def stream_synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def stream_destroy(self, stream: int) -> None:
        self._streams.pop(stream)

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        self._drv.memcpy_htod_async(dst, src, self._streams[stream])

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        self._drv.memcpy_dtoh_async(dst, src, self._streams[stream])

    def close(self) -> None:
        self._context.pop()


def load_cuda(device: int = 0) -> CudaApi:
    """The installed CUDA binding: cuda-python's runtime API, else pycuda, else a clear error."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        api = _CudaPython(cudart)
        api._call("cudaSetDevice", cudart.cudaSetDevice(device))
        return api
    try:
        import pycuda.driver as driver
    except ImportError:
        raise PromptsegError("no CUDA binding installed | expected cuda-python (`pip install promptseg[tensorrt]`) "
                             "or pycuda for the TensorRT backend") from None
    return _PyCuda(driver, device)


class HostDeviceBuffer:
    """One tensor's pinned host staging area and device buffer, grown (never shrunk) to fit."""

    def __init__(self, cuda: CudaApi) -> None:
        self._cuda = cuda
        self.capacity = 0
        self.device = 0
        self.host = np.empty(0, np.uint8)

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.capacity:
            return
        self.free()
        device = self._cuda.malloc(nbytes)
        try:
            host = self._cuda.malloc_host(nbytes)
        except BaseException:  # no pinned memory: give the device allocation back, or it leaks
            self._cuda.free(device)
            raise
        self.device, self.host, self.capacity = device, host, nbytes

    def host_view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The first bytes of the pinned buffer seen as an array of ``dtype`` and ``shape``."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.host[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.capacity:
            self._cuda.free(self.device)
            self._cuda.free_host(self.host)
            self.capacity, self.device, self.host = 0, 0, np.empty(0, np.uint8)
