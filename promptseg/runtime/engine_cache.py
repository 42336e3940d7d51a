"""TensorRT engines cached under a key of everything that makes an engine valid.

An engine only runs on the GPU model and TensorRT version it was built with, for the shapes of its
optimisation profile, and is only right for the ONNX it came from. The key holds GPU name and
compute capability, TensorRT version, precision, shape profile and the ONNX sha256; its digest
names the file, and a manifest beside the engine repeats the key, so an engine whose manifest
does not match (or whose bytes changed) is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PromptsegError
from ..io import sha256_file, write_bytes_atomic, write_json_atomic

Shape = tuple[int, ...]


def parse_shape(text: str, input_name: str = "image") -> Shape:
    """``1x3x64x64`` or trtexec's ``image:1x3x64x64`` -> ``(1, 3, 64, 64)``."""
    name, _, dims = text.rpartition(":")
    if name and name != input_name:
        raise PromptsegError(f"shape {text!r}: input {name!r} | expected {input_name!r} (or no name)")
    if not re.fullmatch(r"\d+(x\d+)*", dims):
        raise PromptsegError(f"shape {text!r} | expected dims joined by x, e.g. 1x3x64x64")
    shape = tuple(int(d) for d in dims.split("x"))
    if min(shape) < 1:
        raise PromptsegError(f"shape {text!r}: a dim below 1 | expected every dim >= 1")
    return shape


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile for the input ``image``: inclusive min/max, tuned for opt."""

    min: Shape
    opt: Shape
    max: Shape

    def validate(self) -> ShapeProfile:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise PromptsegError(f"shape profile {self.describe()}: ranks differ | expected one rank")
        if not all(lo <= o <= hi for lo, o, hi in zip(self.min, self.opt, self.max, strict=True)):
            raise PromptsegError(f"shape profile {self.describe()} | expected min <= opt <= max in every dim")
        return self

    def describe(self) -> str:
        return " / ".join("x".join(str(d) for d in s) for s in (self.min, self.opt, self.max))


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    profile: ShapeProfile
    onnx_sha256: str

    def to_json(self) -> dict:
        """Plain JSON types (tuples as lists), so a key compares equal to one read back from a manifest."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def filename(self, stem: str) -> str:
        return f"{stem}.{self.precision}.{self.digest[:16]}.engine"


def manifest_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def read_manifest(engine_path: Path) -> dict | None:
    """The engine's manifest, or None when missing or unreadable (bad bytes, not JSON, no key with
    a precision): such an engine is rebuilt or refused, never loaded on a guess."""
    path = manifest_path(engine_path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    key = manifest.get("key") if isinstance(manifest, dict) else None
    return manifest if isinstance(key, dict) and "precision" in key else None


def mismatches(cached: dict, wanted: dict, fields=None) -> list[str]:
    """``field: cached X | now Y`` for each field of ``wanted`` (or of ``fields``) that differs."""
    names = fields if fields is not None else list(wanted)
    return [f"{n}: cached {cached.get(n)!r} | now {wanted[n]!r}" for n in names if cached.get(n) != wanted[n]]


def cache_decision(manifest: dict | None, key: EngineKey, engine_sha256: str | None) -> tuple[bool, str]:
    """Whether the engine on disk may be loaded for ``key``, and why (or why not).

    ``engine_sha256`` is the hash of the file found (None: no file); the manifest must name the
    same key field by field and the same bytes.
    """
    if engine_sha256 is None:
        return False, "no cached engine"
    if manifest is None:
        return False, "cached engine has no readable manifest"
    diff = mismatches(manifest.get("key", {}), key.to_json())
    if diff:
        return False, "cached engine does not match: " + "; ".join(diff)
    if manifest.get("engine_sha256") != engine_sha256:
        return False, "cached engine's bytes differ from its manifest"
    return True, "cached engine matches"


class EngineCache:
    """A folder of ``<stem>.<precision>.<digest>.engine`` files, each with a ``.engine.json`` manifest."""

    def __init__(self, root) -> None:
        self.root = Path(root)

    def path_for(self, key: EngineKey, stem: str) -> Path:
        return self.root / key.filename(stem)

    def lookup(self, key: EngineKey, stem: str) -> tuple[Path | None, str]:
        """The engine to load for ``key`` (None: build one) and the reason."""
        path = self.path_for(key, stem)
        found = sha256_file(path) if path.is_file() else None
        ok, reason = cache_decision(read_manifest(path), key, found)
        return (path if ok else None), reason

    def store(self, key: EngineKey, stem: str, engine: bytes, metadata_props: dict[str, str],
              build: dict) -> Path:
        """Write the engine, then its manifest (the manifest last: a crash leaves no loadable pair)."""
        path = self.path_for(key, stem)
        write_bytes_atomic(path, engine)
        write_json_atomic(manifest_path(path), {
            "key": key.to_json(), "digest": key.digest, "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "metadata": metadata_props, "build": build,
        })
        return path
