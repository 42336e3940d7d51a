"""The ``promptseg`` command line: a thin layer over the Python API.

Heavy imports (torch, open_clip) happen inside the commands that need them, so the device-side
commands start fast and work with the base install.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import PromptsegError


class _Group(click.Group):
    """Turns every :class:`PromptsegError` into ``Error: message`` and exit code 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PromptsegError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="promptseg")
def main() -> None:
    """promptseg: train a CLIP-guided weakly-supervised segmenter from image-level labels,
    export it, and run it on an edge device.

    Start with `promptseg demo`: it generates the synthetic world and runs every stage on a CPU.
    """


# ----------------------------------------------------------------------------- data


@main.group(cls=_Group)
def data() -> None:
    """Datasets: generate the synthetic world, convert a COCO-format export; VOC/COCO are read in place."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; one seed gives identical files.")
@click.option("--train", "n_train", default=2000, show_default=True, help="Number of training images.")
@click.option("--val", "n_val", default=400, show_default=True, help="Number of validation images.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--context-prob", default=0.85, show_default=True,
              help="Probability that a class appears on its own background context.")
@click.option("--clip-images", default=3000, show_default=True,
              help="Extra captioned images for CLIP pretraining (weaker co-occurrence, no masks).")
def data_synth(out: Path, seed: int, n_train: int, n_val: int, size: int, context_prob: float,
               clip_images: int) -> None:
    """Write the synthetic co-occurrence world to OUT in PASCAL VOC 2012 layout.

    Six classes (boat, train, cow, plane, car, bird), each mostly seen on its own context
    (water, railway, grass, sky, road, tree) and drawn in two variants whose captions use a
    synonym. Besides the VOC files it writes ContextMasks/ (to measure CAM leak onto contexts),
    classes.json (names, synonyms, contexts) and captions.jsonl (for CLIP pretraining, including the
    `clip` split: scenes of the same world with weak class-context co-occurrence, as web data has).
    """
    from .data.synth import SynthConfig, write_world

    cfg = SynthConfig(seed=seed, train=n_train, val=n_val, size=size, context_prob=context_prob,
                      clip_images=clip_images)
    cfg.validate()
    with click.progressbar(length=n_train + n_val + clip_images, label="synth world") as bar:
        write_world(out, cfg, progress=bar.update)
    click.echo(f"wrote {n_train} train + {n_val} val images to {out}")


# ----------------------------------------------------------------------------- train


@main.group(cls=_Group)
def train() -> None:
    """Training stages (needs the `train` extra: torch, open_clip)."""


@train.command("clip")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset in VOC layout with captions.jsonl (e.g. from `promptseg data synth`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--model", default="promptseg-tiny-clip", show_default=True, help="open_clip model config name.")
@click.option("--steps", default=300, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
def train_clip_cmd(data_dir, out, model, steps, batch_size, lr, seed, threads, resume) -> None:
    """Pretrain a small CLIP on captions.jsonl and report its zero-shot multi-label mAP.

    Writes clip.pt (loadable with open_clip.create_model_and_transforms(MODEL, pretrained=...)),
    the model config, config.json and report.json (key clip_zero_shot_map) to --out.
    """
    from .train.clip import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(data=data_dir, out=out, model=model, steps=steps, batch_size=batch_size,
                          lr=lr, seed=seed, threads=threads)
    report = train_clip(cfg, resume=resume)
    click.echo(f"zero-shot mAP on val: {report['clip_zero_shot_map']:.3f}  ({out}/report.json)")


@train.command("cam")
@click.option("--method", type=click.Choice(["baseline", "clims", "pole", "semples"]),
              help="baseline (default): multilabel soft margin; the others add CLIP guidance.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Dataset in VOC layout.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="A JSON CamTrainConfig (e.g. configs/voc_clims.json); the options given here override it.")
@click.option("--clip", "clip_pretrained", help="CLIP weights: a `promptseg train clip` run, a file or a tag.")
@click.option("--clip-model", default=None, help="open_clip model name [default: promptseg-tiny-clip].")
@click.option("--init-from", help="CAM run (or cam_net.pt) that a CLIP-guided method starts from: the baseline "
              "for CLIMS and POLE; SemPLeS's generator S (the demo refines CLIMS's network, head only).")
@click.option("--split", help="Image list to train on, ImageSets/Segmentation/SPLIT.txt [default: train]. A split "
              "without masks (the world's `clip` web images) trains a backbone for --backbone.")
@click.option("--backbone", type=click.Path(exists=True, dir_okay=False),
              help="Initial trunk weights: a torchvision ResNet state dict (ImageNet) or another run's cam_net.pt.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--seed", type=int)
@click.option("--threads", type=int, help="torch CPU threads.")
@click.option("--cbs-threshold", help="L_CBS threshold, or 'auto' to take it from this CLIP's similarities.")
@click.option("--background-words", help="Comma-separated CLIMS background prompts (default: CLIMS's VOC list).")
@click.option("--candidates", type=click.Path(exists=True, dir_okay=False),
              help="POLE: JSON {class: [names]} (default: the dataset's classes.json synonyms).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), help="Training device [default: cpu].")
@click.option("--amp/--no-amp", default=None,
              help="bf16 autocast (fp16 on GPUs without bf16) [default: on where the CPU/GPU has bf16 units, "
                   "fp32 elsewhere; the report records which].")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory format [default: on].")
@click.option("--resume", is_flag=True, help="Continue the run directory's last checkpoint.")
def train_cam_cmd(method, data_dir, out, config_file, clip_pretrained, clip_model, init_from, split, backbone, epochs,
                  batch_size, lr, seed, threads, cbs_threshold, background_words, candidates, device, amp,
                  channels_last, resume) -> None:
    """Train a CAM network and score its CAMs (mIoU, context leak) into OUT/report.json.

    The background threshold of `cam_miou` is chosen on the val split; numbers that looked at the
    scored labels are reported as oracle_*. Data parallel: start it with
    `torchrun --nproc_per_node N -m promptseg train cam ...` (NCCL on GPUs, gloo on CPU; the
    batch size is global and split over the processes; rank 0 writes the files).
    """
    from dataclasses import replace

    from .configs import load_config
    from .train.cam_train import train_cam
    from .train.config import CamTrainConfig, default_guidance

    if config_file:
        cfg = load_config(CamTrainConfig, config_file)
    elif data_dir and out:
        cfg = CamTrainConfig(data=data_dir, out=out)
    else:
        raise click.UsageError("give --data and --out, or --config")
    changes = {k: v for k, v in {"data": data_dir, "out": out, "method": method, "split": split, "epochs": epochs,
                                  "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
                                  "device": device, "amp": amp, "channels_last": channels_last}.items()
               if v is not None}
    cfg = replace(cfg, **changes)
    if backbone:
        cfg = replace(cfg, net=replace(cfg.net, pretrained=backbone))
    if cfg.method != "baseline":
        guide = {k: v for k, v in {"clip_pretrained": clip_pretrained, "clip_model": clip_model,
                                    "init_from": init_from, "candidates": candidates}.items() if v is not None}
        if cbs_threshold is not None:
            guide["cbs_threshold"] = None if cbs_threshold == "auto" else float(cbs_threshold)
        if background_words:
            guide["background_words"] = tuple(w.strip() for w in background_words.split(",") if w.strip())
        base = cfg.guidance or default_guidance(cfg.method, **({"clip_model": clip_model} if clip_model else {}))
        cfg = replace(cfg, guidance=replace(base, **guide))
    report = train_cam(cfg, resume=resume)
    if not report:  # a torchrun process other than rank 0
        return
    if "cam_miou" not in report:  # a split without masks
        click.echo(f"{cfg.method}: trained on {cfg.split} (no masks to score there); val CAM mIoU "
                   f"{report.get('val_cam_miou', float('nan')):.1f}  ({cfg.out}/cam_net.pt)")
        return
    click.echo(f"{cfg.method}: CAM mIoU {report['cam_miou']:.1f} (threshold {report['background_threshold']}, "
               f"{report['background_threshold_source']}), context leak {report['context_leak']}, "
               f"oracle mIoU {report['oracle_cam_miou']:.1f}  ({cfg.out}/report.json)")


@train.command("seg")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--masks", type=click.Path(exists=True, file_okay=False),
              help="Pseudo-mask folder from `promptseg pseudo-masks`; omit to train on ground truth (reference).")
@click.option("--arch", type=click.Choice(["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]),
              default="lraspp_mobilenet_v3_large", show_default=True)
@click.option("--input-size", default=128, show_default=True, help="Side the network runs at.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=5e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--resume", is_flag=True)
def train_seg_cmd(data_dir, out, masks, arch, input_size, epochs, batch_size, lr, seed, threads, resume) -> None:
    """Train the edge segmenter (MobileNetV3 LR-ASPP or DeepLabV3) and score it on val."""
    from .train.seg import SegTrainConfig, train_segmenter

    cfg = SegTrainConfig(data=data_dir, out=out, masks=masks, arch=arch, input_size=input_size, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, threads=threads)
    report = train_segmenter(cfg, resume=resume)
    click.echo(f"segmenter val mIoU {report['seg_val_miou']:.1f}  ({out}/report.json)")


@main.command("pseudo-masks")
@click.argument("cam_run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--split", default="train", show_default=True)
@click.option("--low", type=float, help="Background below this CAM value (with --crf: the CRF's background level) "
              "[default: chosen on the run's val split].")
@click.option("--high", type=float, help="Foreground from this value; between low and high is 255 (ignored).")
@click.option("--crf", is_flag=True, help="Dense-CRF refinement, CLIMS's settings (needs the crf extra).")
@click.option("--scales", default="1.0,0.5,1.5,2.0", show_default=True, help="CAM inference scales.")
@click.option("--workers", default=2, show_default=True, help="Processes running the CRF (one per core).")
def pseudo_masks_cmd(cam_run, out, split, low, high, crf, scales, workers) -> None:
    """Turn a CAM run's multi-scale CAMs into pseudo-mask PNGs (VOC palette) and score them."""
    from .train.pseudo import PseudoMaskConfig, make_pseudo_masks

    cfg = PseudoMaskConfig(cam_run=cam_run, out=out, split=split, low=low, high=high, crf=crf,
                           cam_scales=_scales(scales), workers=workers)
    report = make_pseudo_masks(cfg)
    miou = report["pseudo_mask_miou"]
    click.echo(f"wrote {report['images']} masks to {out}" + (f"; pseudo-mask mIoU {miou:.1f}" if miou is not None
                                                             else ""))


@main.command("cams")
@click.argument("cam_run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--split", default="train", show_default=True)
@click.option("--scales", default="1.0,0.5,1.5,2.0", show_default=True)
def cams_cmd(cam_run, out, split, scales) -> None:
    """Multi-scale, flipped CAM inference: OUT/<id>.npy (C x H x W float16, 0..1, zero for absent classes)."""
    from .train.pseudo import save_cams

    count = save_cams(cam_run, out, split, _scales(scales))
    click.echo(f"wrote CAMs of {count} images to {out}")


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"got {text!r} | expected comma-separated numbers like 1.0,0.5") from None
    if not values or min(values) <= 0:
        raise click.BadParameter(f"got {text!r} | expected positive scales")
    return values


# ----------------------------------------------------------------------------- export


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: RUN_DIR/export].")
@click.option("--method", type=click.Choice(["baseline", "clims", "pole", "semples"]), default="semples",
              show_default=True, help="Whose CAM network and pseudo-mask segmenter to export.")
@click.option("--parity-images", default=64, show_default=True, help="Real val images the parity gate runs.")
@click.option("--max-abs-diff", default=1e-3, show_default=True, help="Parity bound on float outputs.")
@click.option("--min-label-agreement", default=0.999, show_default=True, help="Parity bound on argmax labels.")
def export_cmd(run_dir: Path, out: Path | None, method: str, parity_images: int, max_abs_diff: float,
               min_label_agreement: float) -> None:
    """Export a finished demo/pipeline run for the device: no torch, no CLIP text encoder there.

    Writes segmenter.onnx and cam.onnx (input `image` N x 3 x H x W float32 RGB 0..1; normalisation
    and resizing are inside the graphs), text_features.npy (the learned prompts folded to constant
    L2-normalised features), manifest.json and export_report.json. Exits non-zero when PyTorch and
    ONNX Runtime disagree on real val images beyond the bounds.
    """
    from .export import ExportConfig, export_run

    out = out or run_dir / "export"
    report = export_run(ExportConfig(run=str(run_dir), out=str(out), method=method, parity_images=parity_images,
                                     max_abs_diff=max_abs_diff, min_label_agreement=min_label_agreement))
    for name, entry in report["files"].items():
        click.echo(f"{name}: max |diff| {entry['max_abs_diff']:.2e}, label agreement "
                   f"{100 * entry['label_agreement']:.3f}% on {entry['images']} images")
    click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------- demo


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder that receives everything of this run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--from-scratch", is_flag=True,
              help="Train the tiny CLIP and the CAM backbone in this run (from --seed) instead of taking the "
                   "package's prebuilt ones (`promptseg prebuilt build`, world seed 0).")
def demo(out: Path, seed: int, from_scratch: bool) -> None:
    """Run the whole chain on the embedded synthetic world, on a CPU, with nothing downloaded.

    Synthetic world -> tiny CLIP (prebuilt, scored on this world; trained with --from-scratch) ->
    CAMs of baseline, CLIMS, POLE, SemPLeS -> pseudo-masks (dense
    CRF when the crf extra is installed) -> segmenter on SemPLeS's pseudo-masks (and on ground
    truth, as the reference) -> ONNX export with a parity gate -> INT8 for TensorRT and for this
    CPU with an accuracy gate -> latency bench -> report.md, report.json and PNGs in OUT. Finished
    stages whose config and inputs are unchanged are kept, so a rerun continues an interrupted demo.
    """
    from .pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(out=str(out), seed=seed, prebuilt=not from_scratch))
    click.echo((out / "report.md").read_text())


@main.group(cls=_Group)
def prebuilt() -> None:
    """The demo's prebuilt stand-ins for downloaded weights (tiny CLIP, CAM backbone)."""


@prebuilt.command("build")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="World and training seed of both stand-ins.")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
def prebuilt_build(out: Path, seed: int, threads: int) -> None:
    """Train the tiny CLIP and the CAM backbone on the synthetic world as `promptseg demo
    --from-scratch` does, and write them with manifest.json (command, configs, sha256) to OUT.

    The package ships the output of `promptseg prebuilt build promptseg/assets/prebuilt`.
    """
    from .prebuilt import build

    manifest = build(out, seed=seed, threads=threads)
    click.echo(f"wrote {out}: CLIP zero-shot mAP {manifest['clip_zero_shot_map']:.3f}, "
               f"stage seconds {manifest['stage_seconds']}")


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Override the config's `out`.")
def pipeline(config_file: Path, out: Path | None) -> None:
    """Run the train-then-export chain described by CONFIG_FILE (a JSON PipelineConfig).

    Keys (all optional; the defaults are the demo): `data` (a VOC-layout root; null = the synthetic
    world), `clip_model` + `clip_pretrained` (null = pretrain the tiny CLIP), `cam_config` (a JSON
    CamTrainConfig used as every method's base, e.g. configs/voc_baseline.json), `methods`,
    `seg_methods`, `ship_method`, epochs, `calibration_images`, `calibration_method`, `max_drop`,
    `bench_batches`. Unknown keys are an error. Stages whose config and inputs are unchanged are kept.
    """
    from dataclasses import replace

    from .configs import load_config
    from .pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, config_file)
    if out is not None:
        cfg = replace(cfg, out=str(out))
    run_pipeline(cfg)
    click.echo((Path(cfg.out) / "report.md").read_text())


# ----------------------------------------------------------------------------- device side
# The runtime and calibration commands live beside their code (torch-free); registered here.

from .calibration.cli import calibrate  # noqa: E402
from .runtime.cli import bench, build_engine, compare, infer  # noqa: E402

for _command in (infer, bench, compare, build_engine, calibrate):
    main.add_command(_command)

from .data.coco_import import import_coco_cmd  # noqa: E402

data.add_command(import_coco_cmd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
