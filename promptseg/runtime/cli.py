"""The device-side commands: ``infer``, ``bench``, ``compare``, ``build-engine``.

Registered on ``promptseg.cli.main``; a thin layer over :mod:`promptseg.runtime`'s Python API.
Nothing here imports torch, so they run on a device with the base install.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import PromptsegError
from .backends import BACKENDS, BackendOptions
from .precision import PRECISIONS, RUN_PRECISIONS
from .spec import OVERLAY_FORMATS

_MODEL = click.Path(exists=True, dir_okay=False, path_type=Path)


def _providers(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _backend_options(f):
    """The options every command passes to its backends."""
    options = [
        click.option("--providers", default="cpu", show_default=True,
                     help="ONNX Runtime providers, comma-separated (tensorrt, cuda, cpu) or 'auto' for all present."),
        click.option("--threads", type=click.IntRange(min=1),
                     help="ONNX Runtime intra-op threads [default: all cores; infer: half of them]."),
        click.option("--precision", type=click.Choice(RUN_PRECISIONS),
                     help="TensorRT engine (fp32, fp16, int8) or OpenVINO (fp32, bf16 where the CPU has it, int8) "
                          "precision; ONNX Runtime runs the graph as it is [default: the ONNX graph's own]."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="TensorRT engine cache [default: engines/ beside the model]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class FrameProgress:
    """A progress bar with the frame rate on stderr; a counter line when the total is unknown (a stream)."""

    def __init__(self, label: str = "infer"):
        self.label, self.count, self.bar, self._last = label, 0, None, 0.0
        self._started = time.perf_counter()

    def start(self, total: int | None) -> None:
        self._started = time.perf_counter()
        if total:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()

    def update(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        rate = self.count / max(now - self._started, 1e-9)
        if self.bar is not None:
            self.bar.label = f"{self.label} {rate:5.1f} fps"
            self.bar.update(n)
        elif now - self._last > 0.5:
            self._last = now
            click.echo(f"\r{self.label}: {self.count} frames, {rate:.1f} fps", err=True, nl=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        elif self.count:
            click.echo("", err=True)


@click.command("infer")
@click.argument("model", type=_MODEL)
@click.argument("more_inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True,
              help="An image file, a folder of images, or one video: a file (.mp4, .mkv, ...), an rtsp:// or "
                   "http:// stream, or a V4L2 camera (/dev/video0). Repeatable for images. Paths after MODEL count "
                   "too (globs work).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for masks/, overlays/ (overlay.mp4 for a video) and summary.json.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Frames per inference (every frame runs at the network's input size, so any frames batch); "
                   "1 for the lowest latency, 4-8 for the most frames per second.")
@click.option("--overlay", is_flag=True, help="Also write the frame with the mask tinted over it.")
@click.option("--overlay-format", type=click.Choice(OVERLAY_FORMATS), default="jpeg", show_default=True,
              help="Image overlays as JPEG (fast) or PNG (lossless). A video's overlay is always overlay.mp4.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Video: stop after this many frames.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Host threads for decoding and encoding [default: the CPU count, at most 4].")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels are refused (checked from the header, before decoding).")
@_backend_options
def infer(model, more_inputs, inputs, out, backend, batch, overlay, overlay_format, max_frames, workers, max_pixels,
          providers, threads, precision, cache_dir) -> None:
    """Segment images or a video with MODEL: palette-PNG masks (and overlays) into OUT.

    Frames are decoded at the resolution the network needs, run at its input size, and their masks
    come back at each frame's own size. Decoding, inference and encoding overlap. A file or frame
    that cannot be used is reported with the reason, the others are still processed, and the exit
    code is 1 if any failed. OUT/summary.json lists every file (or the video's frame counts) and the
    per-frame time of each stage (decode, pre, graph, post, encode).
    """
    from .infer import InferConfig, run_infer

    paths = tuple(str(p) for p in (*inputs, *more_inputs))
    if not paths:
        raise click.UsageError("give images or a video with --input")
    cfg = InferConfig(model=str(model), inputs=paths, out=str(out), backend=backend, batch=batch, overlay=overlay,
                      overlay_format=overlay_format, max_frames=max_frames, workers=workers, max_pixels=max_pixels,
                      options=BackendOptions(providers=_providers(providers), threads=threads, precision=precision,
                                             cache_dir=cache_dir)).validate()
    bar = FrameProgress()
    try:
        summary = run_infer(cfg, progress=bar.update, on_total=bar.start)
    finally:
        bar.close()
    for record in summary.get("files", ()):
        if not record["ok"]:
            click.echo(f"failed: {record['reason']}", err=True)
    for reason in summary.get("reasons", ()):
        click.echo(f"failed: {reason}", err=True)
    skipped = summary.get("video", {}).get("failed_to_decode")
    if skipped:
        click.echo(f"warning: {skipped} packets of the video could not be decoded and were skipped", err=True)
    if summary["precision_note"]:
        click.echo(f"note: {summary['precision_note']}", err=True)
    total = summary["succeeded"] + summary["failed"]
    timing = summary["timing_ms"]
    stages = ", ".join(f"{k} {v['p50']:.1f}" for k, v in timing.items())
    click.echo(f"{summary['succeeded']} of {total} {'frames' if summary['input'] == 'video' else 'images'} -> "
               f"{out / 'masks'} ({backend}, {summary['precision']}, {summary['frames_per_s'] or 0:.1f} frames/s end "
               f"to end; p50 ms per frame: {stages})")
    if summary["failed"]:
        raise PromptsegError(f"{summary['failed']} of {total} inputs failed "
                             f"(reasons above and in {out / 'summary.json'})")


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=_MODEL)
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS), default=("onnxruntime",),
              show_default=True, help="Repeatable.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1,), show_default=True,
              help="Repeatable.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--iters", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--input", "-i", "inputs", multiple=True,
              help="End to end: run infer on this image folder or video (decode, pre, graph, post, encode per "
                   "frame at the source's resolution) instead of timing the graph on random inputs.")
@click.option("--overlay", is_flag=True, help="End to end: write overlays too.")
@click.option("--workers", type=click.IntRange(min=1), help="End to end: infer's host threads.")
@click.option("--max-frames", type=click.IntRange(min=1), help="End to end: frames of a video to use.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of rows; the plot goes beside it as .png (graph rows).")
@_backend_options
def bench(models, backends, batches, warmup, iters, inputs, overlay, workers, max_frames, out, providers, threads,
          precision, cache_dir) -> None:
    """Latency (min/p50/p90/p99/max), throughput, host pre/post time, cold start and peak RSS of
    each MODEL x backend x batch, each measured in a fresh subprocess.

    With --input: frames per second end to end on real frames, each host stage's p50/p90 per frame,
    the graph's own time at the network's input size and peak RSS, per MODEL x backend x batch.
    """
    from ..io import write_json_atomic
    from .bench import BenchConfig, format_table, run_bench, write_results
    from .framerate import FramerateConfig, format_framerate_table, run_framerate

    options = BackendOptions(providers=_providers(providers), threads=threads, precision=precision,
                             cache_dir=cache_dir)
    if inputs:
        configs = [FramerateConfig(model=str(m), inputs=tuple(inputs), backends=tuple(backends),
                                   batches=tuple(batches), overlay=overlay, workers=workers, max_frames=max_frames,
                                   options=options).validate() for m in models]
        with click.progressbar(length=len(models) * len(backends) * len(batches), label="bench",
                               file=sys.stderr) as bar:
            rows = [row for cfg in configs for row in run_framerate(cfg, progress=bar.update)]
        click.echo(format_framerate_table(rows))
        write_json_atomic(out, rows)
        click.echo(f"wrote {out}")
        return
    cfg = BenchConfig(models=tuple(str(m) for m in models), backends=tuple(backends), batches=tuple(batches),
                      warmup=warmup, iters=iters, options=options).validate()
    with click.progressbar(length=len(models) * len(backends) * len(batches), label="bench", file=sys.stderr) as bar:
        rows = run_bench(cfg, progress=bar.update)
    click.echo(format_table(rows))
    for row in rows:
        if row.get("precision_note"):
            click.echo(f"note: {Path(row['model']).name} on {row['backend']}, batch {row['batch']}: "
                       f"{row['precision_note']}")
    json_path, png_path = write_results(rows, out)
    click.echo(f"wrote {json_path} and {png_path}")


@click.command("compare")
@click.argument("model_a", type=_MODEL)
@click.argument("model_b", type=_MODEL)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A VOC-layout dataset (VOC 2012 or a synthetic world).")
@click.option("--split", default="val", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N images of the split.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--backend-a", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--backend-b", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report here.")
@_backend_options
def compare(model_a, model_b, data, split, limit, batch, backend_a, backend_b, out, providers, threads, precision,
            cache_dir) -> None:
    """Run MODEL_A and MODEL_B on the same images: logit differences, label agreement and each
    model's mIoU against the ground truth."""
    from ..io import write_json_atomic
    from .compare import CompareConfig, compare_models

    report = compare_models(CompareConfig(
        model_a=str(model_a), model_b=str(model_b), data=data, split=split, limit=limit, batch=batch,
        backend_a=backend_a, backend_b=backend_b,
        options=BackendOptions(providers=_providers(providers), threads=threads, precision=precision,
                               cache_dir=cache_dir)))
    a, b = report["model_a"], report["model_b"]
    click.echo(f"{report['images']} images of {split}: max |diff| {report['logits']['max_abs_diff']:.3g}, "
               f"mean |diff| {report['logits']['mean_abs_diff']:.3g}, label agreement "
               f"{100 * report['label_agreement']:.2f}%")
    click.echo(f"mIoU  A {100 * a['miou']:.1f} ({a['precision']})  B {100 * b['miou']:.1f} ({b['precision']})  "
               f"delta {100 * report['miou_delta']:+.1f}")
    for tag, model in (("A", a), ("B", b)):
        if model["precision_note"]:
            click.echo(f"note: {tag}: {model['precision_note']}")
    if out is not None:
        write_json_atomic(out, report)
        click.echo(f"wrote {out}")
    else:
        click.echo(json.dumps(report, indent=2))


@click.command("build-engine")
@click.argument("model", type=_MODEL)
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="fp32, fp16 or int8 [default: the ONNX graph's own: int8 when it has Q/DQ].")
@click.option("--min-shape", help="Smallest input, e.g. 1x3x16x16 or image:1x3x16x16.")
@click.option("--opt-shape", help="Input TensorRT tunes for, e.g. 1x3x64x64.")
@click.option("--max-shape", help="Largest input, e.g. 4x3x1024x1024.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Largest batch of the default profile (when no shapes are given).")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16, max=4096),
              help="Largest image side of the default profile.")
@click.option("--workspace", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Builder workspace memory pool, MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file, read and updated.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Engine cache [default: engines/ beside MODEL].")
def build_engine(model, precision, min_shape, opt_shape, max_shape, batch, max_side, workspace, timing_cache,
                 cache_dir) -> None:
    """Build (or find in the cache) the TensorRT engine of MODEL.onnx for this GPU.

    The cache key is GPU + compute capability, TensorRT version, precision, shape profile and the
    ONNX's sha256; an engine that does not match is rebuilt, never loaded. TensorRT 11 is strongly
    typed only: int8 needs a Q/DQ ONNX and fp16 an FP16-cast ONNX; TensorRT 10.x can also make fp16
    from an fp32 ONNX with its builder flag.
    """
    from .backends.tensorrt import cached_engine
    from .engine_cache import ShapeProfile, parse_shape

    shapes = (min_shape, opt_shape, max_shape)
    if any(shapes) and not all(shapes):
        raise click.UsageError("give all of --min-shape, --opt-shape and --max-shape, or none")
    profile = ShapeProfile(*(parse_shape(s) for s in shapes)).validate() if all(shapes) else None
    options = BackendOptions(precision=precision, profile=profile, max_batch=batch, max_side=max_side,
                             workspace_mib=workspace, cache_dir=cache_dir, timing_cache=timing_cache).validate()
    path, note = cached_engine(model, options)
    click.echo(f"{path} ({note})")
