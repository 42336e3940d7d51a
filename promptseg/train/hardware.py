"""What the machine can do, and the precision and memory format a stage runs in on it.

bf16 autocast pays on a CPU only where it has bf16 units (AVX-512 BF16 or AMX): elsewhere PyTorch
emulates bf16 and runs slower than fp32 (an AVX2-only EPYC here: a 2048^2 matmul at 65 GFLOP/s in
fp32 and far slower in bf16). So ``amp=None`` (auto) means bf16 where the units exist and fp32
elsewhere; ``amp=False`` (``--no-amp``) is always fp32. Channels-last (NHWC) lets oneDNN pick its
blocked convolutions on a CPU and tensor cores on a GPU; it changes only summation order.

Stages report what they ran with (:func:`precision_facts`) and their achieved FLOP rate
(:class:`Throughput`), which the pipeline divides by the matmul peak it measures at its start
(:func:`matmul_peak_gflops`): a share of the machine, not a comparison with the last version.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return True
    try:  # a torch without the probes: read the kernel's flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_amp(requested: bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: None (fp32) unless AMP is on, or auto and worth it."""
    if requested is False:
        return None
    if device.type == "cuda":
        if requested is None and not torch.cuda.is_available():
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested is None:
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16  # asked for explicitly: honoured even where it is emulated


def resolve_channels_last(requested: bool | None) -> bool:
    """NHWC unless turned off: measured on the 2-core CPU, CAM forward 1.45x at 64 px, 1.19x at
    128 px; training steps 1.04x (CAM network) and 1.10x (MobileNetV3 segmenter)."""
    return True if requested is None else requested


def precision_facts(amp_dtype: torch.dtype | None, channels_last: bool) -> dict:
    """What a run's report records about how it computed."""
    return {"amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32",
            "channels_last": channels_last,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_units": cpu_has_bf16()}


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """An autocast context for ``amp_dtype``, or a no-op one for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 1536, seconds: float = 1.0) -> float:
    """GFLOP/s of the fastest of repeated square matmuls at the current thread count: the machine's
    usable peak (the fastest run, as a shared machine's neighbours only ever slow a run down)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: allocation and kernel choice
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds or best == float("inf"):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * size ** 3 / best / 1e9


def machine_peaks() -> dict:
    """fp32 matmul peak, and bf16's where the CPU has the units to make it count."""
    peaks = {"fp32": round(matmul_peak_gflops(torch.float32), 1)}
    if cpu_has_bf16():
        peaks["bf16"] = round(matmul_peak_gflops(torch.bfloat16), 1)
    return peaks


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """grad_input and grad_weight each cost what the forward convolution does. PyTorch's own formula
    ignores ``groups`` and counts a 64-channel depthwise convolution's backward 64x too high (measured:
    the MobileNetV3 segmenter's training step came out at 2.4x this CPU's matmul peak)."""
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn) -> tuple[object, int]:
    """Run ``fn()`` once under PyTorch's FLOP counter (grouped convolutions' backward corrected):
    (its result, FLOPs it took)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


@dataclass
class Throughput:
    """Images and FLOPs a stage processed and the seconds it took: ``images_per_s``, ``gflops_per_s``."""

    images: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    _started: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def add(self, images: int, flops: float) -> None:
        self.images += images
        self.flops += flops

    def report(self) -> dict:
        seconds = max(self.seconds, 1e-9)
        return {"images_per_s": round(self.images / seconds, 1),
                "gflops_per_s": round(self.flops / seconds / 1e9, 2),
                "gflop_per_image": round(self.flops / max(self.images, 1) / 1e9, 4)}
