"""The chain a user meets first: ``promptseg demo`` runs every stage that exists on the synthetic world."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .io import read_json, write_json_atomic


@dataclass(frozen=True)
class DemoConfig:
    """One demo run; saved as ``config.json`` in the run folder."""

    out: str = "runs/demo"
    seed: int = 0
    train_images: int = 2000
    val_images: int = 400
    image_size: int = 64
    clip_steps: int = 300
    threads: int = 2


def _world_is_current(data_dir: Path, expected: dict) -> bool:
    classes = data_dir / "classes.json"
    return classes.is_file() and read_json(classes).get("synth_config") == expected


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict:
    """Synthetic world -> tiny CLIP -> ``report.json``; stages whose outputs are current are kept."""
    from .data.synth import SynthConfig, write_world
    from .train.clip import ClipTrainConfig, train_clip

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    synth = SynthConfig(seed=cfg.seed, train=cfg.train_images, val=cfg.val_images, size=cfg.image_size)
    data_dir = out / "data"
    if not _world_is_current(data_dir, synth.__dict__):
        write_world(data_dir, synth)
    timings["data_s"] = time.perf_counter() - started

    started = time.perf_counter()
    clip_cfg = ClipTrainConfig(data=str(data_dir), out=str(out / "clip"), steps=cfg.clip_steps,
                               seed=cfg.seed, threads=cfg.threads)
    clip_report = train_clip(clip_cfg, resume=True, show_progress=show_progress)
    timings["clip_s"] = time.perf_counter() - started

    report = {
        "seed": cfg.seed,
        "clip_zero_shot_map": clip_report["clip_zero_shot_map"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "summary": {"clip_zero_shot_map": round(clip_report["clip_zero_shot_map"], 3)},
    }
    write_json_atomic(out / "report.json", report)
    return report
