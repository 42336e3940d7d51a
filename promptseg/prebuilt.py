"""The stand-ins for what a real user downloads, shipped prebuilt in the package.

A real run starts from OpenAI's CLIP and ImageNet weights: fixed files, the same for every seed of
an experiment. The demo's stand-ins are a tiny CLIP pretrained on the synthetic world's web images
and a CAM backbone trained on those images' labels. ``promptseg prebuilt build OUT`` trains both
exactly as ``promptseg demo --from-scratch`` does (the same stage configs, world seed 0) and writes
``manifest.json`` (the command, each stage's config and seconds, the files' sha256); the package
ships its output in ``promptseg/assets/prebuilt``. The demo uses them unless ``--from-scratch``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PromptsegError
from .io import read_json, sha256_file, write_json_atomic

PREBUILT_DIR = Path(__file__).with_name("assets") / "prebuilt"
MANIFEST = "manifest.json"
BUILD_SEED = 0


def load_manifest(root: Path = PREBUILT_DIR) -> dict:
    """The manifest of a prebuilt folder, its files checked against their recorded sha256."""
    path = root / MANIFEST
    if not path.is_file():
        raise PromptsegError(f"{root}: no prebuilt stand-ins ({MANIFEST} missing); run the demo with "
                             "--from-scratch, or build them with `promptseg prebuilt build DIR`")
    manifest = read_json(path)
    for name, digest in manifest["sha256"].items():
        if not (root / name).is_file() or sha256_file(root / name) != digest:
            raise PromptsegError(f"{root / name}: missing or not the file the manifest records; rebuild with "
                                 f"`{manifest['command']}`")
    return manifest


def clip_dir(root: Path = PREBUILT_DIR) -> Path:
    return root / "clip"


def backbone_file(root: Path = PREBUILT_DIR) -> Path:
    return root / "pretrain" / "cam_net.pt"


def standin_pipeline(out: Path, seed: int = BUILD_SEED, threads: int = 2, **world):
    """The pipeline config whose first stages train the stand-ins (``world``: smaller worlds for tests)."""
    from .pipeline import PipelineConfig

    return PipelineConfig(out=str(out), seed=seed, threads=threads, prebuilt=False, **world)


def build(out: Path, seed: int = BUILD_SEED, threads: int = 2, show_progress: bool = True, **world) -> dict:
    """Train the stand-ins into ``out`` (``clip/``, ``pretrain/cam_net.pt``, ``manifest.json``)."""
    from .pipeline import run_standins

    out = Path(out)
    work = out / "work"
    cfg = standin_pipeline(work, seed, threads, **world)
    timings: dict = {}
    standins = run_standins(cfg, timings, show_progress)
    files = {"clip/clip.pt": work / "clip" / "clip.pt",
             "clip/promptseg-tiny-clip.json": work / "clip" / "promptseg-tiny-clip.json",
             "clip/report.json": work / "clip" / "report.json",
             "pretrain/cam_net.pt": work / "pretrain" / "cam_net.pt",
             "pretrain/report.json": work / "pretrain" / "report.json"}
    for name, source in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / name)
    manifest = {"command": f"promptseg prebuilt build {out} --seed {seed} --threads {threads}",
                "seed": seed, "threads": threads, "stage_configs": standins["configs"],
                "stage_seconds": timings, "clip_zero_shot_map": standins["clip_report"]["clip_zero_shot_map"],
                "sha256": {name: sha256_file(out / name) for name in files}}
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(work)
    return manifest
