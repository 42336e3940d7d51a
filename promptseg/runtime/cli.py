"""The device-side commands: ``infer``, ``bench``, ``compare``, ``build-engine``.

Registered on ``promptseg.cli.main``; a thin layer over :mod:`promptseg.runtime`'s Python API.
Nothing here imports torch, so they run on a device with the base install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import PromptsegError
from .backends import BACKENDS, BackendOptions
from .precision import PRECISIONS, RUN_PRECISIONS

_MODEL = click.Path(exists=True, dir_okay=False, path_type=Path)


def _providers(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _backend_options(f):
    """The options every command passes to its backends."""
    options = [
        click.option("--providers", default="cpu", show_default=True,
                     help="ONNX Runtime providers, comma-separated (tensorrt, cuda, cpu) or 'auto' for all present."),
        click.option("--threads", type=click.IntRange(min=1),
                     help="ONNX Runtime intra-op threads [default: all cores]."),
        click.option("--precision", type=click.Choice(RUN_PRECISIONS),
                     help="TensorRT engine (fp32, fp16, int8) or OpenVINO (fp32, bf16 where the CPU has it, int8) "
                          "precision; ONNX Runtime runs the graph as it is [default: the ONNX graph's own]."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="TensorRT engine cache [default: engines/ beside the model]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command("infer")
@click.argument("model", type=_MODEL)
@click.argument("more_inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True, type=click.Path(path_type=Path),
              help="An image file or a folder of images; repeatable. Paths after MODEL count too (globs work).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for masks/, overlays/ and summary.json.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Images per inference (images of one size batch together).")
@click.option("--overlay", is_flag=True, help="Also write the image with the mask tinted over it.")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16, max=4096),
              help="Larger images are downscaled to this side for the model; masks come back at full size.")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels are refused (checked from the header, before decoding).")
@_backend_options
def infer(model, more_inputs, inputs, out, backend, batch, overlay, max_side, max_pixels, providers, threads,
          precision, cache_dir) -> None:
    """Segment images with MODEL: palette-PNG masks (and overlays) into OUT.

    A file that cannot be used is reported by name with the reason, the others are still
    processed, and the exit code is 1 if any failed. OUT/summary.json lists every file.
    """
    from .infer import InferConfig, collect_inputs, run_infer

    paths = tuple(str(p) for p in (*inputs, *more_inputs))
    if not paths:
        raise click.UsageError("give images with --input (files or folders)")
    cfg = InferConfig(model=str(model), inputs=paths, out=str(out), backend=backend, batch=batch, overlay=overlay,
                      max_side=max_side, max_pixels=max_pixels,
                      options=BackendOptions(providers=_providers(providers), threads=threads, precision=precision,
                                             cache_dir=cache_dir)).validate()
    with click.progressbar(length=len(collect_inputs(cfg.inputs)), label="infer", file=sys.stderr) as bar:
        summary = run_infer(cfg, progress=bar.update)
    for record in summary["files"]:
        if not record["ok"]:
            click.echo(f"failed: {record['reason']}", err=True)
    if summary["precision_note"]:
        click.echo(f"note: {summary['precision_note']}", err=True)
    rate = summary["succeeded"] / summary["inference_seconds"] if summary["inference_seconds"] else 0.0
    click.echo(f"{summary['succeeded']} of {summary['images']} images -> {out / 'masks'} "
               f"({backend}, {summary['precision']}, {rate:.1f} img/s inference)")
    if summary["failed"]:
        raise PromptsegError(f"{summary['failed']} of {summary['images']} inputs failed "
                             f"(reasons above and in {out / 'summary.json'})")


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=_MODEL)
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS), default=("onnxruntime",),
              show_default=True, help="Repeatable.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1,), show_default=True,
              help="Repeatable.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--iters", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of rows; the plot goes beside it as .png.")
@_backend_options
def bench(models, backends, batches, warmup, iters, out, providers, threads, precision, cache_dir) -> None:
    """Latency (min/p50/p90/p99/max), throughput, host pre/post time, cold start and peak RSS of
    each MODEL x backend x batch, each measured in a fresh subprocess."""
    from .bench import BenchConfig, format_table, run_bench, write_results

    cfg = BenchConfig(models=tuple(str(m) for m in models), backends=tuple(backends), batches=tuple(batches),
                      warmup=warmup, iters=iters,
                      options=BackendOptions(providers=_providers(providers), threads=threads, precision=precision,
                                             cache_dir=cache_dir)).validate()
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
