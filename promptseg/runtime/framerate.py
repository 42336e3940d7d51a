"""``promptseg bench MODEL --input FRAMES``: what a user feeding real frames gets, end to end.

Each row runs ``infer`` on an image folder or a video in a fresh subprocess (so its peak RSS is the
device's), writing into a temporary folder, and reports per frame at the source's resolution the
p50/p90 of decode, host pre, graph, host post and encode, the frames per second of the whole run,
and its ratio to the graph's own time at the network's input size (:func:`.bench.measure`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PromptsegError
from .backends import BACKENDS, BackendOptions

ROW_MARK = "PROMPTSEG_FRAMERATE_ROW "
_CHILD = "import json, sys; from promptseg.runtime.framerate import child_main; child_main(json.loads(sys.argv[1]))"


@dataclass(frozen=True)
class FramerateConfig:
    model: str
    inputs: tuple[str, ...]  # an image folder / files, or one video
    backends: tuple[str, ...] = ("onnxruntime",)
    batches: tuple[int, ...] = (1,)
    overlay: bool = False
    workers: int | None = None
    max_frames: int | None = None
    graph_iters: int = 50  # the graph-only figure the rows are compared with
    options: BackendOptions = field(default_factory=BackendOptions)
    timeout_s: float = 1800.0

    def validate(self) -> FramerateConfig:
        if not Path(self.model).is_file():
            raise PromptsegError(f"{self.model}: model file not found")
        if not self.inputs:
            raise PromptsegError("inputs: got none | expected an image folder or a video")
        for backend in self.backends:
            if backend not in BACKENDS:
                raise PromptsegError(f"backend: got {backend!r} | expected one of {', '.join(BACKENDS)}")
        if not self.batches or min(self.batches) < 1:
            raise PromptsegError(f"batch: got {list(self.batches)} | expected sizes >= 1")
        self.options.validate()
        return self


def child_main(args: dict) -> None:
    """In the subprocess: one end-to-end run and the graph alone at its batch, printed as one JSON row."""
    from .backends import open_runner
    from .bench import measure, peak_rss_mb
    from .infer import InferConfig, run_infer

    options = BackendOptions.from_json(args["options"])
    try:
        with tempfile.TemporaryDirectory(prefix="promptseg-framerate-") as out:
            summary = run_infer(InferConfig(model=args["model"], inputs=tuple(args["inputs"]), out=out,
                                            backend=args["backend"], batch=args["batch"], overlay=args["overlay"],
                                            workers=args["workers"], max_frames=args["max_frames"],
                                            options=options))
        with open_runner(args["model"], args["backend"], options) as runner:
            graph = measure(runner, args["batch"], warmup=5, iters=args["graph_iters"])
    except PromptsegError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
    summary.pop("files", None)
    summary.get("video", {}).pop("per_frame_ms", None)
    summary["graph_only_ms_per_frame"] = graph["p50_ms"] / args["batch"]
    summary["peak_rss_mb"] = peak_rss_mb()
    print(ROW_MARK + json.dumps(summary), flush=True)


def framerate_row(cfg: FramerateConfig, backend: str, batch: int) -> dict:
    from .bench import _child_env

    args = {"model": str(cfg.model), "inputs": list(cfg.inputs), "backend": backend, "batch": batch,
            "overlay": cfg.overlay, "workers": cfg.workers, "max_frames": cfg.max_frames,
            "graph_iters": cfg.graph_iters, "options": cfg.options.to_json()}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                              env=_child_env(), timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        raise PromptsegError(f"end-to-end bench on {backend}, batch {batch}: no result in "
                             f"{cfg.timeout_s:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:]) or f"exit code {done.returncode}"
        raise PromptsegError(f"end-to-end bench on {backend}, batch {batch} failed: {tail}")
    summary = json.loads(lines[-1][len(ROW_MARK):])
    per_frame_ms = 1e3 / summary["frames_per_s"] if summary.get("frames_per_s") else None
    graph_ms = summary["graph_only_ms_per_frame"]
    return {"model": str(cfg.model), "input": ", ".join(cfg.inputs), "kind": summary["input"], "backend": backend,
            "precision": summary["precision"], "batch": batch, "overlay": cfg.overlay, "workers": summary["workers"],
            "frames": summary["succeeded"], "failed": summary["failed"], "frames_per_s": summary["frames_per_s"],
            "ms_per_frame": per_frame_ms, "graph_only_ms_per_frame": graph_ms,
            "end_to_end_over_graph": per_frame_ms / graph_ms if per_frame_ms and graph_ms else None,
            "timing_ms": summary["timing_ms"], "peak_rss_mb": summary["peak_rss_mb"]}


def run_framerate(cfg: FramerateConfig, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Every backend x batch row, in that order."""
    cfg.validate()
    rows = []
    for backend in cfg.backends:
        for batch in cfg.batches:
            rows.append(framerate_row(cfg, backend, batch))
            if progress is not None:
                progress(1)
    return rows


def format_framerate_table(rows: list[dict]) -> str:
    stages = ("decode", "pre", "graph", "post", "encode")
    lines = ["| input | backend | batch | overlay | frames/s | ms/frame | graph-only ms | ratio | "
             + " | ".join(f"{s} p50/p90" for s in stages) + " | peak RSS MB |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in stages)
             + " | ---: |"]
    for row in rows:
        timing = row["timing_ms"]
        cells = [f"{timing[s]['p50']:.1f}/{timing[s]['p90']:.1f}" if s in timing else "-" for s in stages]
        lines.append(f"| {row['kind']} | {row['backend']} | {row['batch']} | {'yes' if row['overlay'] else 'no'} | "
                     f"{row['frames_per_s']:.1f} | {row['ms_per_frame']:.1f} | {row['graph_only_ms_per_frame']:.2f} | "
                     f"{row['end_to_end_over_graph']:.1f} | " + " | ".join(cells) + f" | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
