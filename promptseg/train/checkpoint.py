"""Checkpoints written atomically and read with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PromptsegError
from ..io import atomic_write


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save ``state`` (tensors, numbers, strings, nested dicts/lists) via temp file + rename."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PromptsegError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise PromptsegError(f"{path}: not a loadable promptseg checkpoint ({exc})") from None


def config_record(cfg) -> dict:
    """A dataclass config as JSON types: what checkpoints store to refuse a resume under another config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_resume_config(state: dict[str, Any], cfg, path: str | os.PathLike) -> None:
    if state["config"] != config_record(cfg):
        raise PromptsegError(f"{path}: saved with a different config; rerun without --resume")


def capture_rng(loader_generator: torch.Generator) -> dict[str, Any]:
    """torch, DataLoader, Python and NumPy (timm's RandAugment draws its ops there) RNG states in
    ``weights_only``-loadable form (no tuples of ints, no arrays)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(), "loader_rng": loader_generator.get_state(),
            "py_rng": [version, list(internal), gauss],
            "np_rng": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch_rng"])
    loader_generator.set_state(state["loader_rng"])
    version, internal, gauss = state["py_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["np_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
