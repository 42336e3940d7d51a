"""``promptseg bench``: trtexec-style figures per model, backend and batch size.

Each row runs in a fresh Python subprocess, so its cold start (imports + session or engine load)
and peak RSS are the device's, not polluted by the parent; inside it, every iteration is timed with
``perf_counter``: host pre-processing (stacking uint8 images into the float input), inference, and
host post-processing (the palette PNGs of the labels) apart. Inputs are random images at the
model's metadata ``input_size``. Percentiles are numpy's linear interpolation. A TensorRT engine is
built (or found in the cache) before its rows, so their cold start is a load, not a build.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np

from ..errors import PromptsegError
from ..io import write_json_atomic
from .backends import BACKENDS, BackendOptions, import_backend, open_runner
from .processing import labels_to_png, stack_batch

ROW_MARK = "PROMPTSEG_BENCH_ROW "
# The child starts its clock before any import, so ``import_s`` counts numpy and the backend too.
_CHILD = ("import time; t0 = time.perf_counter(); import json, sys; "
          "from promptseg.runtime.bench import child_main; child_main(t0, json.loads(sys.argv[1]))")


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...]
    backends: tuple[str, ...] = ("onnxruntime",)
    batches: tuple[int, ...] = (1,)
    warmup: int = 10
    iters: int = 100
    options: BackendOptions = field(default_factory=BackendOptions)
    timeout_s: float = 1800.0  # one row; a TensorRT build on a Jetson can take minutes

    def validate(self) -> BenchConfig:
        if not self.models:
            raise PromptsegError("models: got none | expected at least one model file")
        for model in self.models:
            if not Path(model).is_file():
                raise PromptsegError(f"{model}: model file not found")
        for backend in self.backends:
            if backend not in BACKENDS:
                raise PromptsegError(f"backend: got {backend!r} | expected one of {', '.join(BACKENDS)}")
        if not self.batches or min(self.batches) < 1:
            raise PromptsegError(f"batch: got {list(self.batches)} | expected sizes >= 1")
        if self.warmup < 0 or self.iters < 1:
            raise PromptsegError(f"warmup/iters: got {self.warmup}/{self.iters} | expected >= 0 / >= 1")
        self.options.validate()
        return self


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MiB (None where neither source exists).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    ``ru_maxrss`` is not used there: it survives exec, so a child forked from a big parent (a
    pipeline with torch loaded) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _stats(ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"min_ms": float(values.min()), "mean_ms": float(values.mean()), "p50_ms": float(p50),
            "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(values.max())}


def measure(runner, batch: int, warmup: int, iters: int, size_hw: tuple[int, int] | None = None) -> dict:
    """Latency figures of an active runner on ``batch`` random images at ``size_hw`` (None: its
    metadata's input size)."""
    meta = runner.metadata
    h, w = size_hw or meta.input_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch)]
    tick = perf_counter()
    runner.infer({"image": stack_batch(images)})
    first_ms = (perf_counter() - tick) * 1e3
    for _ in range(warmup):
        runner.infer({"image": stack_batch(images)})
    pre, lat, post = [], [], []
    for _ in range(iters):
        t0 = perf_counter()
        x = stack_batch(images)
        t1 = perf_counter()
        out = runner.infer({"image": x})
        t2 = perf_counter()
        for labels in out.get("labels", ()):  # CAM graphs have no labels: no post-processing
            labels_to_png(labels, meta.palette)
        t3 = perf_counter()
        pre.append(t1 - t0)
        lat.append(t2 - t1)
        post.append(t3 - t2)
    lat_ms = [s * 1e3 for s in lat]
    return {"input_shape": [batch, 3, h, w], "first_infer_ms": first_ms, **_stats(lat_ms),
            "throughput": batch * iters / sum(lat), "pre_ms": 1e3 * float(np.mean(pre)),
            "post_ms": 1e3 * float(np.mean(post))}


def child_main(t0: float, args: dict) -> None:
    """Run in the subprocess: one row, printed as ``ROW_MARK`` + JSON on stdout."""
    try:
        import_backend(args["backend"])
        t_import = perf_counter()
        runner = open_runner(args["model"], args["backend"], BackendOptions.from_json(args["options"]))
        runner.activate()
        t_ready = perf_counter()
        rss_ready = peak_rss_mb()
        row = measure(runner, args["batch"], args["warmup"], args["iters"])
        row["providers"] = getattr(runner, "providers", [])
        row["precision"] = runner.precision  # what ran: a TensorRT engine built fp16 from an fp32 ONNX says fp16
        row["precision_note"] = runner.precision_note  # e.g. bf16 asked for on a CPU without bf16 units
        runner.deactivate()
    except PromptsegError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
    row.update(import_s=t_import - t0, session_s=t_ready - t_import, cold_start_s=t_ready - t0,
               rss_ready_mb=rss_ready, peak_rss_mb=peak_rss_mb())
    print(ROW_MARK + json.dumps(row), flush=True)


def _child_env() -> dict[str, str]:
    """The parent's environment with this promptseg first on the path (it may not be installed)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _row_options(cfg: BenchConfig, backend: str) -> BackendOptions:
    if backend != "tensorrt":
        return cfg.options
    # one engine (one profile) serves every batch size of the run
    return BackendOptions.from_json({**cfg.options.to_json(), "max_batch": max(cfg.batches)})


def bench_row(model: str, backend: str, batch: int, cfg: BenchConfig) -> dict:
    """One model/backend/batch row, measured in a fresh subprocess."""
    from .precision import precision_of

    options = _row_options(cfg, backend)
    args = {"model": str(model), "backend": backend, "batch": batch, "warmup": cfg.warmup, "iters": cfg.iters,
            "options": options.to_json()}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                              env=_child_env(), timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        raise PromptsegError(f"bench {model} on {backend}, batch {batch}: no result in {cfg.timeout_s:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:]) or f"exit code {done.returncode}"
        raise PromptsegError(f"bench {model} on {backend}, batch {batch} failed: {tail}")
    measured = json.loads(lines[-1][len(ROW_MARK):])
    precision = measured.pop("precision", None) or precision_of(model)
    return {"model": str(model), "backend": backend, "precision": precision, "batch": batch,
            **measured, "warmup": cfg.warmup, "iters": cfg.iters}


def run_bench(cfg: BenchConfig, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Every model x backend x batch row, in that order."""
    cfg.validate()
    rows = []
    for model in cfg.models:
        for backend in cfg.backends:
            if backend == "tensorrt" and Path(model).suffix == ".onnx":
                from .backends.tensorrt import cached_engine

                cached_engine(model, _row_options(cfg, backend))  # build here: a row's cold start loads it
            for batch in cfg.batches:
                rows.append(bench_row(model, backend, batch, cfg))
                if progress is not None:
                    progress(1)
    return rows


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict:
    """What the figures were measured on, including the load average at the end of the run."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    try:
        openvino = version("openvino")
    except PackageNotFoundError:
        openvino = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # other work on the machine skews the tails
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_1_5_15": load,
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino}


_COLUMNS = (("model", "model", "{}"), ("backend", "backend", "{}"), ("precision", "prec", "{}"),
            ("batch", "batch", "{}"), ("p50_ms", "p50 ms", "{:.2f}"), ("p90_ms", "p90 ms", "{:.2f}"),
            ("p99_ms", "p99 ms", "{:.2f}"), ("max_ms", "max ms", "{:.2f}"), ("throughput", "img/s", "{:.1f}"),
            ("pre_ms", "pre ms", "{:.2f}"), ("post_ms", "post ms", "{:.2f}"), ("cold_start_s", "cold s", "{:.2f}"),
            ("peak_rss_mb", "RSS MB", "{:.0f}"))


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of the rows (model shown by file name)."""
    lines = ["| " + " | ".join(title for _, title, _ in _COLUMNS) + " |",
             "| " + " | ".join("---" if key in ("model", "backend", "precision") else "---:"
                               for key, _, _ in _COLUMNS) + " |"]
    for row in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            value = Path(row[key]).name if key == "model" else row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict], path) -> Path:
    """A PNG bar chart drawn with Pillow: p50 latency bars with a p90..p99 whisker, one row each."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    labels = [f"{Path(r['model']).name} | {r['backend']} | {r['precision']} | batch {r['batch']}" for r in rows]
    measure_text = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 20 + int(max(measure_text.textlength(label, font=font) for label in labels))
    bar_w, row_h, top = 440, 26, 34
    width, height = label_w + bar_w + 170, top + row_h * len(rows) + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "latency per batch (bar p50, whisker p90..p99), ms", fill="black", font=font)
    scale = bar_w / max(max(r["p99_ms"] for r in rows), 1e-9)
    colours = {"fp32": (70, 110, 180), "fp16": (90, 160, 90), "int8": (210, 120, 40)}
    for k, row in enumerate(rows):
        y = top + k * row_h
        draw.text((10, y + 6), labels[k], fill="black", font=font)
        x0 = label_w
        draw.rectangle([x0, y + 4, x0 + max(1, row["p50_ms"] * scale), y + row_h - 6],
                       fill=colours.get(row["precision"], (120, 120, 120)))
        mid = y + row_h // 2 - 1
        draw.line([x0 + row["p90_ms"] * scale, mid, x0 + row["p99_ms"] * scale, mid], fill="black", width=2)
        draw.text((x0 + bar_w + 8, y + 6), f"{row['p50_ms']:.2f} ms  {row['throughput']:.0f} img/s",
                  fill="black", font=font)
    draw.line([label_w, top - 2, label_w, height - 20], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_results(rows: Sequence[dict], out) -> tuple[Path, Path]:
    """``out`` (JSON list of rows) and its ``.png`` plot beside it."""
    out = Path(out)
    write_json_atomic(out, list(rows))
    return out, plot_rows(rows, out.with_suffix(".png"))
