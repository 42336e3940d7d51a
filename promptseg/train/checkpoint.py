"""Checkpoints written atomically and read with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
