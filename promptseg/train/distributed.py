"""Devices, mixed precision and data parallelism for the training loops.

``torchrun --nproc_per_node N -m promptseg train cam ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; the
loops then train with DistributedDataParallel (NCCL on CUDA, gloo on CPU), split the global
batch over the processes and let rank 0 alone write files and evaluate. Without those variables
everything runs in one process, as before.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .hardware import autocast, resolve_amp, resolve_channels_last

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """Where and how one process trains."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = fp32
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16 (fp16 on GPUs without bf16) autocast when AMP is on, a no-op context otherwise."""
        return autocast(self.device, self.amp_dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigError(f"device: got {name!r} | expected one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda asked for, but torch sees no CUDA GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup(device: str, amp: bool | None, channels_last: bool | None) -> Runtime:
    """The process's :class:`Runtime`; joins the process group when started by torchrun.

    ``amp``/``channels_last`` None: auto (:mod:`.hardware`: bf16 only where the CPU or GPU has it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        atexit.register(_destroy)  # one group per process, kept across stages (SemPLeS runs three)
    return Runtime(target, rank, world_size, resolve_amp(amp, target), resolve_channels_last(channels_last))


def average_gradients(params, runtime: Runtime) -> None:
    """All-reduce-mean the gradients of parameters DDP does not own (POLE's adaptors)."""
    if not runtime.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= runtime.world_size


def broadcast_parameters(params, runtime: Runtime) -> None:
    """Give every process rank 0's values of parameters DDP does not own."""
    if not runtime.distributed:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
