"""The chain a user meets first: data -> CLIP -> CAM methods -> pseudo-masks -> segmenter -> export
-> INT8 calibration -> runtime bench -> report. ``promptseg pipeline CONFIG`` runs it on any
VOC-layout dataset and CLIP; ``promptseg demo`` runs it on the embedded synthetic world.

Stages write into one run folder. Each stage records ``stage.json`` (its config and the sha256 of
the files it reads); a stage whose record matches and whose ``report.json`` exists is kept, and
one that matches but has no report resumes, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import ConfigError, PromptsegError
from .io import atomic_write, read_json, sha256_file, write_json_atomic, write_text_atomic
from .train.clip import TINY_CLIP, ClipSpec

CAM_METHODS = ("baseline", "clims", "pole", "semples")
# ablations a pipeline may add to `methods`: name -> (the method it runs, its guidance changes)
ABLATIONS = {"semples_no_suppression": ("semples", {"w_refine": 0.0})}  # SemPLeS's own control: same S, no (c) term


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline run; saved as ``config.json`` in the run folder. The defaults are the demo."""

    out: str = "runs/demo"
    seed: int = 0
    # data: a VOC-layout root, or None to generate the synthetic world into OUT/data
    data: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_images: int = 2000  # synthetic world only (also val_images, clip_images, image_size)
    val_images: int = 400
    clip_images: int = 3000
    image_size: int = 64
    # CLIP: an open_clip model and pretrained tag/file, or None to pretrain the tiny CLIP on the world
    clip_model: str = TINY_CLIP
    clip_pretrained: str | None = None
    clip_steps: int = 300
    # the synthetic world's CLIP and CAM backbone: the package's prebuilt ones (trained by `promptseg
    # prebuilt build`, fixed across seeds like OpenAI's CLIP and ImageNet weights), or trained in the run
    prebuilt: bool = True
    # CAM stages: a JSON CamTrainConfig as the base of every method (net, crop, ...), or the demo's
    cam_config: str | None = None
    methods: tuple[str, ...] = CAM_METHODS
    # CAM backbone: first trained on this labelled split when the data has it (the synthetic world's
    # web images, weak class-context co-occurrence: the stand-in for the references' ImageNet weights)
    pretrain_split: str | None = "clip"
    pretrain_epochs: int = 8
    baseline_epochs: int = 8
    method_epochs: int = 5  # 3 left CLIMS undertrained (seed 0: 32.5 at 3, 38.2 at 5)
    method_lr: float = 1e-4  # CLIMS, POLE; 2e-4 made CLIMS unstable (seed 0: 29.8 or 35.9 by thread count)
    # SemPLeS stages (a), (c): the reference's 5.12e-4 x batch / 512 (batch 32). At 1e-4, stage (a)
    # spread the bird map over the tree (seed 0, web-pretrained backbone: bird CAM IoU 20 vs 38)
    semples_lr: float = 3.2e-5
    # SemPLeS refines a CAM generator S (its backbone frozen, its head trained): the network of this
    # earlier method's run. The reference's S (WeakTr) never saw CLIP before stage (a): "baseline"
    semples_generator: str = "baseline"
    # S's trainable head: "3x3" (a 3x3 convolution, the reference's kind, started from S's 1x1 classifier
    # as its centre tap) or "1x1"
    semples_head: str = "3x3"
    # SemPLeS's training procedure: demo choices, the one the demo's numbers were measured with (the
    # reference's, which CamTrainConfig's defaults and configs/voc_semples.json follow, in brackets;
    # None here takes it). Not measured on the world: RandomResizedCrop down to 8% of a 64 px image.
    semples_classifier_lr_mult: float | None = 10.0  # (a), (c) [1: one AdamW group]
    semples_weight_decay: float | None = 1e-4  # (a), (c) [0.03]
    semples_schedule: str | None = "poly"  # (a), (c): per step [cosine_epoch]
    semples_prompt_schedule: str | None = "cosine_step"  # (b) [cosine_epoch]
    semples_augment: str | None = "scale_crop"  # every stage [(a), (c) randaugment; (b) resized_crop]
    # pseudo-masks: dense CRF "on", "off", or "auto" (on when the crf extra is installed)
    crf: str = "auto"
    # segmenters: trained on the pseudo-masks of `seg_methods`; `ship_method`'s is exported
    seg_methods: tuple[str, ...] = ("semples",)
    ship_method: str = "semples"
    seg_epochs: int = 10
    seg_input_size: int = 64
    # export, calibration, bench
    calibration_images: int = 256
    calibration_method: str = "minmax"
    max_drop: float = 1.0
    bench_batches: tuple[int, ...] = (1, 16)
    bench_iters: int = 50
    threads: int = 2

    def validate(self) -> None:
        if not self.methods or self.methods[0] != "baseline" or set(self.methods) - set(CAM_METHODS) - set(ABLATIONS):
            raise ConfigError(f"methods: got {list(self.methods)} | expected 'baseline' first, then some of "
                              f"{', '.join((*CAM_METHODS[1:], *ABLATIONS))}")
        if not set(self.seg_methods) <= set(self.methods) or self.ship_method not in self.seg_methods:
            raise ConfigError(f"seg_methods {list(self.seg_methods)} / ship_method {self.ship_method!r}: "
                              f"expected seg_methods among methods and ship_method among seg_methods")
        if "semples" in self.methods and self.semples_generator not in self.methods[:self.methods.index("semples")]:
            raise ConfigError(f"semples_generator: got {self.semples_generator!r} | expected a method run before "
                              f"semples among {list(self.methods)}")
        if self.crf not in ("auto", "on", "off"):
            raise ConfigError(f"crf: got {self.crf!r} | expected auto, on or off")
        if self.semples_head not in ("1x1", "3x3"):
            raise ConfigError(f"semples_head: got {self.semples_head!r} | expected 1x1 or 3x3")
        from .train.config import AUGMENTS, SCHEDULES

        for name, choices in (("semples_schedule", SCHEDULES), ("semples_prompt_schedule", SCHEDULES),
                              ("semples_augment", AUGMENTS)):
            if getattr(self, name) not in (None, *choices):
                raise ConfigError(f"{name}: got {getattr(self, name)!r} | expected null or one of {', '.join(choices)}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"data: {self.data} is not a directory")


def _fingerprint(config, inputs: tuple[Path, ...]) -> dict:
    """What a stage's output depends on: its config and the sha256 of the files it reads."""
    return {"config": json.loads(json.dumps(asdict(config))),
            "inputs": {str(path): sha256_file(path) for path in inputs}}


def _stage(name: str, run_dir: Path, config, run: Callable[[bool], dict], timings: dict,
           inputs: tuple[Path, ...] = (), report_name: str = "report.json") -> dict:
    """Keep a finished stage whose config and inputs are unchanged; resume an interrupted one with
    the same config and inputs; else start afresh. ``timings[name]`` gets the seconds the stage's
    work took when it ran (recorded in its ``stage.json``), not the instant a kept stage takes."""
    started = time.perf_counter()
    stamp_path = run_dir / "stage.json"
    fingerprint = _fingerprint(config, inputs)
    stamp = read_json(stamp_path) if stamp_path.is_file() else {}
    same = {k: stamp.get(k) for k in fingerprint} == fingerprint
    if same and (run_dir / report_name).is_file():
        timings[name] = stamp.get("seconds")  # None: finished before stages recorded their time
        return read_json(run_dir / report_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp_path, fingerprint)  # before the run: an interrupted stage resumes
    report = run(same)
    timings[name] = round(time.perf_counter() - started, 1)
    write_json_atomic(stamp_path, {**fingerprint, "seconds": timings[name]})
    return report


def method_guidance(cfg: PipelineConfig, method: str, clip_pretrained: str, init_from: str):
    """A CLIP-guided method's settings (METHODS.md's, or the tiny CLIP's when it is the CLIP),
    starting from the CAM run ``init_from``; SemPLeS's stage (b) with the pipeline's choices."""
    from .train.config import default_guidance

    stage_b = {"prompt_schedule": cfg.semples_prompt_schedule, "prompt_augment": cfg.semples_augment} \
        if method == "semples" else {}
    return default_guidance(method, clip_model=cfg.clip_model, clip_pretrained=clip_pretrained, init_from=init_from,
                            **{k: v for k, v in stage_b.items() if v is not None})


def method_config(cfg: PipelineConfig, base, method: str, clip_pretrained: str):
    """The CamTrainConfig of a CLIP-guided method (or ablation) ``method``: the baseline run's ``base`` with
    the pipeline's epochs, lr and start; SemPLeS with its generator, head and procedure choices."""
    kind, changes = ABLATIONS.get(method, (method, {}))
    out = Path(cfg.out)
    start = out / (cfg.semples_generator if kind == "semples" else "baseline")  # CLIMS, POLE: the baseline
    guidance = replace(method_guidance(cfg, kind, clip_pretrained, str(start)), **changes)
    method_cfg = replace(base, method=kind, out=str(out / method), epochs=cfg.method_epochs, lr=cfg.method_lr,
                         guidance=guidance)
    if kind != "semples":
        return method_cfg
    return replace(method_cfg, lr=cfg.semples_lr, net=replace(base.net, head=cfg.semples_head),
                   classifier_lr_mult=cfg.semples_classifier_lr_mult, weight_decay=cfg.semples_weight_decay,
                   schedule=cfg.semples_schedule, augment=cfg.semples_augment)


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True) -> dict:
    """Every stage in order, each kept when current; returns (and writes) the run's report.

    Raises :class:`PromptsegError` at the end, after the report is written, when the INT8 gate failed.
    """
    from .train.cam_train import train_cam
    from .train.hardware import machine_peaks, precision_facts
    from .train.pseudo import PseudoMaskConfig, crf_available, make_pseudo_masks
    from .train.seg import SegTrainConfig, train_segmenter

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg)
    timings: dict[str, float] = {}
    peaks = machine_peaks()  # before any stage: the machine's usable matmul rate, measured, not assumed
    standins = run_standins(cfg, timings, show_progress)
    data_dir, world, clip_pretrained, clip_inputs = (standins[k] for k in ("data_dir", "world", "clip_pretrained",
                                                                          "clip_inputs"))
    base, backbone = standins["base"], standins["backbone"]
    report: dict = {"seed": cfg.seed, **standins["report"],
                    "machine": {**precision_facts(None, False), "threads": cfg.threads, "peak_gflops": peaks}}
    del report["machine"]["amp"], report["machine"]["channels_last"]
    reports: dict[str, dict] = {}
    reports["baseline"] = _stage("baseline", out / "baseline", base,
                                 lambda resume: train_cam(base, resume=resume, show_progress=show_progress), timings,
                                 (*world, *backbone))
    for method in cfg.methods[1:]:
        method_cfg = method_config(cfg, base, method, clip_pretrained)
        start = Path(method_cfg.guidance.init_from)
        reports[method] = _stage(method, out / method, method_cfg,
                                 lambda resume, c=method_cfg: train_cam(c, resume=resume, show_progress=show_progress),
                                 timings, (*world, *clip_inputs, start / "cam_net.pt"))

    methods = {m: {"prompt_changed_share": r["prompt_changed_share"]} if "prompt_changed_share" in r else {}
               for m, r in reports.items()}
    stage_throughput = {m: r.get("train_throughput") | {"amp": r.get("amp")} for m, r in reports.items()
                        if r.get("train_throughput")}
    use_crf = cfg.crf == "on" or (cfg.crf == "auto" and crf_available())
    for method in cfg.methods:
        generator = out / f"pseudo_{cfg.semples_generator}" if ABLATIONS.get(method, (method,))[0] == "semples" \
            else None
        pseudo_cfg = PseudoMaskConfig(cam_run=str(out / method), out=str(out / f"pseudo_{method}"),
                                      split=cfg.train_split, crf=use_crf, workers=cfg.threads,
                                      compare_to=str(generator) if generator else None)
        pseudo = _stage(f"pseudo_{method}", out / f"pseudo_{method}", pseudo_cfg,
                        lambda _, c=pseudo_cfg: make_pseudo_masks(c, show_progress=show_progress), timings,
                        (out / method / "cam_net.pt", *((generator / "report.json",) if generator else ())))
        if "mask_change_share" in pseudo:  # how much SemPLeS moved its generator's masks
            methods[method]["mask_change_share"] = pseudo["mask_change_share"]
        # CAM scores as the references take them (4 scales + flips), from the pass that writes the masks
        methods[method] = {**{k: pseudo[k] for k in ("cam_miou", "context_leak", "oracle_cam_miou")},
                           "cam_threshold": pseudo["cam_threshold"], **methods[method],
                           "pseudo_mask_miou": pseudo["pseudo_mask_miou"], "pseudo_mask_background": pseudo["low"]}
        if pseudo.get("throughput"):
            stage_throughput[f"pseudo_{method}"] = pseudo["throughput"] | {"amp": pseudo.get("amp")}
    seg_base = SegTrainConfig(data=str(data_dir), out="", split=cfg.train_split, val_split=cfg.val_split,
                              epochs=cfg.seg_epochs, input_size=cfg.seg_input_size, seed=cfg.seed,
                              threads=cfg.threads)
    for method in cfg.seg_methods:
        seg_cfg = replace(seg_base, out=str(out / f"seg_{method}"), masks=str(out / f"pseudo_{method}"))
        seg = _stage(f"seg_{method}", out / f"seg_{method}", seg_cfg,
                     lambda resume, c=seg_cfg: train_segmenter(c, resume=resume, show_progress=show_progress),
                     timings, (out / f"pseudo_{method}" / "report.json",))
        methods[method]["seg_val_miou"] = seg["seg_val_miou"]
        if seg.get("train_throughput"):
            stage_throughput[f"seg_{method}"] = seg["train_throughput"] | {"amp": seg.get("amp")}
    gt_cfg = replace(seg_base, out=str(out / "seg_gt"), masks=None)
    seg_gt = _stage("seg_gt", out / "seg_gt", gt_cfg,
                    lambda resume: train_segmenter(gt_cfg, resume=resume, show_progress=show_progress), timings,
                    world)
    if seg_gt.get("train_throughput"):
        stage_throughput["seg_gt"] = seg_gt["train_throughput"] | {"amp": seg_gt.get("amp")}
    for method in cfg.seg_methods:  # a segmenter run's report also names its ground-truth reference
        seg_report = out / f"seg_{method}" / "report.json"
        write_json_atomic(seg_report, {**read_json(seg_report), "seg_val_miou_gt_trained": seg_gt["seg_val_miou"]})
    ship = cfg.ship_method
    report.update({
        "methods": methods,
        "ship_method": ship,
        "pseudo_mask_miou": methods[ship]["pseudo_mask_miou"],
        "pseudo_mask_crf": use_crf,
        "seg_val_miou": methods[ship]["seg_val_miou"],
        "seg_val_miou_gt_trained": seg_gt["seg_val_miou"],
    })
    if "clims" in reports:
        report["cbs_threshold"] = reports["clims"].get("cbs_threshold")

    report.update(_deploy_stages(cfg, out, data_dir, timings, show_progress))
    report["checks"] = reproduction_checks(methods, report["seg_val_miou"], report["seg_val_miou_gt_trained"],
                                           report["calibration"])
    report["throughput"] = peak_shares(stage_throughput, peaks)
    report["timings_s"] = timings
    report["total_s"] = round(sum(v for v in timings.values() if v is not None), 1)
    _pictures(out, data_dir, cfg)
    _latency_plot(report, out / "latency_vs_miou.png")
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    if not all(cal["gate_passed"] for cal in report["calibration"].values()):
        raise PromptsegError(f"INT8 accuracy gate failed (see {out / 'report.md'})")
    return report


def use_prebuilt(cfg: PipelineConfig) -> bool:
    """The shipped stand-ins fit the synthetic world with the tiny CLIP and the default CAM network."""
    return cfg.prebuilt and cfg.data is None and cfg.clip_pretrained is None and cfg.clip_model == TINY_CLIP \
        and cfg.cam_config is None


def clip_train_config(cfg: PipelineConfig, data_dir: Path):
    from .train.clip import ClipTrainConfig

    return ClipTrainConfig(data=str(data_dir), out=str(Path(cfg.out) / "clip"), steps=cfg.clip_steps, seed=cfg.seed,
                           threads=cfg.threads)


def base_cam_config(cfg: PipelineConfig, data_dir: Path):
    """The baseline CAM run's config, which every method's run and the backbone's pretraining start from."""
    from .configs import load_config
    from .train.config import CamTrainConfig

    base = load_config(CamTrainConfig, cfg.cam_config) if cfg.cam_config else CamTrainConfig(
        data="", out="", cam_scales=(1.0,))
    return replace(base, data=str(data_dir), out=str(Path(cfg.out) / "baseline"), method="baseline",
                   split=cfg.train_split, val_split=cfg.val_split, epochs=cfg.baseline_epochs, seed=cfg.seed,
                   threads=cfg.threads, guidance=None)


def pretrain_config(cfg: PipelineConfig, base):
    """The backbone's stand-in for ImageNet training: every layer learns, on batch statistics."""
    return replace(base, out=str(Path(cfg.out) / "pretrain"), split=cfg.pretrain_split, epochs=cfg.pretrain_epochs,
                   freeze_stem=False, fixed_bn=False)


def run_standins(cfg: PipelineConfig, timings: dict, show_progress: bool = True) -> dict:
    """The stages every method rests on: the data, the CLIP and the CAM network's base config with
    its backbone (the world's stand-in for ImageNet weights). Prebuilt stand-ins are scored on this
    world (CLIP) or used as they are (backbone); else they are trained here, as ``promptseg prebuilt
    build`` trains them. Returns the paths, the base CAM config, each stage's config and report parts."""
    from . import prebuilt
    from .data.synth import WORLD_FORMAT, SynthConfig, write_world
    from .train.cam_train import train_cam
    from .train.clip import ClipEvalConfig, evaluate_clip, train_clip

    out = Path(cfg.out)
    started = time.perf_counter()
    if cfg.data is None:
        data_dir = out / "data"
        synth = SynthConfig(seed=cfg.seed, train=cfg.train_images, val=cfg.val_images, size=cfg.image_size,
                            clip_images=cfg.clip_images)
        classes = data_dir / "classes.json"
        written = read_json(classes) if classes.is_file() else {}
        if written.get("synth_config") != asdict(synth) or written.get("world_format") != WORLD_FORMAT:
            write_world(data_dir, synth)
            write_json_atomic(out / "data_seconds.json", {"seconds": round(time.perf_counter() - started, 1)})
        world: tuple[Path, ...] = (data_dir / "classes.json",)
    else:
        data_dir = Path(cfg.data)
        world = tuple(p for p in (data_dir / "ImageSets" / "Segmentation" / f"{s}.txt"
                                  for s in (cfg.train_split, cfg.val_split)) if p.is_file())
    seconds = out / "data_seconds.json"
    timings["data"] = read_json(seconds)["seconds"] if seconds.is_file() else round(time.perf_counter() - started, 1)

    shipped = use_prebuilt(cfg)
    manifest = prebuilt.load_manifest() if shipped else None
    report: dict = {}
    configs: dict = {}
    clip_report = None
    if cfg.clip_pretrained is None:
        if shipped:
            clip_cfg = ClipEvalConfig(data=str(data_dir), out=str(out / "clip"), model=cfg.clip_model,
                                      pretrained=str(prebuilt.clip_dir()), threads=cfg.threads)
            clip_report = _stage("clip", out / "clip", clip_cfg, lambda _: evaluate_clip(clip_cfg), timings,
                                 (*world, prebuilt.clip_dir() / "clip.pt"))
            clip_pretrained = str(prebuilt.clip_dir())
        else:
            clip_cfg = clip_train_config(cfg, data_dir)
            clip_report = _stage("clip", out / "clip", clip_cfg,
                                 lambda resume: train_clip(clip_cfg, resume=resume, show_progress=show_progress),
                                 timings, world)
            clip_pretrained = str(out / "clip")
        configs["clip"] = asdict(clip_cfg)
        report["clip_zero_shot_map"] = clip_report["clip_zero_shot_map"]
        report["clip_object_over_context"] = clip_report.get("clip_object_over_context")
        clip_inputs: tuple[Path, ...] = (Path(clip_pretrained) / "clip.pt",)
    else:  # a given CLIP: its weights file (when it is one) is an input of the CAM stages
        clip_pretrained = cfg.clip_pretrained
        weights = ClipSpec(cfg.clip_model, clip_pretrained).resolve_checkpoint()
        clip_inputs = (Path(weights),) if weights and Path(weights).is_file() else ()

    base = base_cam_config(cfg, data_dir)
    pretrain_list = data_dir / "ImageSets" / "Segmentation" / f"{cfg.pretrain_split}.txt"
    backbone: tuple[Path, ...] = ()
    if shipped:
        backbone = (prebuilt.backbone_file(),)
        report["cam_backbone"] = f"prebuilt (`{manifest['command']}`: the {cfg.pretrain_split} split of world seed " \
                                 f"{manifest['seed']})"
    elif cfg.pretrain_split and pretrain_list.is_file():  # the backbone's stand-in for ImageNet weights
        pretrain = pretrain_config(cfg, base)
        _stage("pretrain", out / "pretrain", pretrain,
               lambda resume: train_cam(pretrain, resume=resume, show_progress=show_progress), timings,
               (*world, pretrain_list))
        configs["pretrain"] = asdict(pretrain)
        backbone = (out / "pretrain" / "cam_net.pt",)
        report["cam_backbone"] = f"pretrained on the {cfg.pretrain_split} split"
    else:
        report["cam_backbone"] = base.net.pretrained or "random initialisation"
    if backbone:
        base = replace(base, net=replace(base.net, pretrained=str(backbone[0])))
    return {"data_dir": data_dir, "world": world, "clip_pretrained": clip_pretrained, "clip_inputs": clip_inputs,
            "base": base, "backbone": backbone, "report": report, "configs": configs, "clip_report": clip_report}


def peak_shares(stage_throughput: dict[str, dict], peaks: dict[str, float]) -> dict[str, dict]:
    """Each stage's achieved GFLOP/s as a share of the matmul peak of the precision it ran in."""
    shares = {}
    for stage, row in stage_throughput.items():
        precision = "bf16" if row.get("amp") == "bfloat16" else "fp32"
        peak = peaks.get(precision)
        shares[stage] = {**row, "peak_gflops": peak,
                         "peak_share": round(row["gflops_per_s"] / peak, 4) if peak else None}
    return shares


def _deploy_stages(cfg: PipelineConfig, out: Path, data_dir: Path, timings: dict, show_progress: bool) -> dict:
    """Export -> calibrate for TensorRT and for this CPU -> bench every shipped model."""
    from .calibration import CalibrationConfig, CalibrationGateError, calibrate
    from .export import ExportConfig, export_run
    from .runtime.bench import BenchConfig, run_bench, write_results

    ship = cfg.ship_method
    export_cfg = ExportConfig(run=str(out), out=str(out / "export"), method=ship, parity_split=cfg.val_split)
    export = _stage("export", out / "export", export_cfg, lambda _: export_run(export_cfg), timings,
                    (out / f"seg_{ship}" / "segmenter.pt", out / ship / "cam_net.pt"), "export_report.json")
    segmenter = out / "export" / "segmenter.onnx"
    cam = out / "export" / "cam.onnx"
    calibration = {}
    # both networks ship in INT8: the segmenter for TensorRT and this CPU, the CAM network for TensorRT,
    # gated on its pseudo-masks at the CAM run's threshold
    for key, model, target in (("tensorrt", segmenter, "tensorrt"), ("cpu", segmenter, "cpu"),
                               ("cam_tensorrt", cam, "tensorrt")):
        cal_cfg = CalibrationConfig(model=str(model), out=str(out / f"int8_{key}"), data=str(data_dir),
                                    split=cfg.train_split, gate_split=cfg.val_split, num=cfg.calibration_images,
                                    method=cfg.calibration_method, target=target, max_drop=cfg.max_drop,
                                    threads=cfg.threads, cam_threshold=None if model == segmenter else
                                    read_json(out / ship / "report.json")["background_threshold"])

        def calibrate_or_record(_, c=cal_cfg):
            try:
                return calibrate(c)
            except CalibrationGateError as exc:  # the report is written; the pipeline reports it at the end
                return exc.report

        calibration[key] = _stage(f"int8_{key}", out / f"int8_{key}", cal_cfg, calibrate_or_record,
                                  timings, (model,), "calibration_report.json")
    models = [str(segmenter)] + [str(out / f"int8_{t}" / r["output"]) for t, r in calibration.items()
                                 if r.get("output") and r.get("precision") == "int8" and r.get("kind") != "cam"]
    bench_cfg = BenchConfig(models=tuple(models), batches=cfg.bench_batches, iters=cfg.bench_iters)

    def bench(_):
        rows = run_bench(bench_cfg)
        write_results(rows, out / "bench" / "bench.json")
        write_json_atomic(out / "bench" / "report.json", {"rows": rows})
        return {"rows": rows}

    bench_report = _stage("bench", out / "bench", bench_cfg, bench, timings, tuple(Path(m) for m in models))
    return {"export": {name: {k: entry[k] for k in ("max_abs_diff", "label_agreement", "parity")}
                       for name, entry in export["files"].items()},
            "calibration": {t: {k: r.get(k) for k in ("method", "chosen", "precision", "output", "gate_passed",
                                                       "miou_fp32", "miou_int8", "miou_drop", "label_agreement",
                                                       "note")}
                            for t, r in calibration.items()},
            "bench": bench_report["rows"]}


def _pictures(out: Path, data_dir: Path, cfg: PipelineConfig, count: int = 6) -> None:
    """``examples.png``: image | ground truth | CAM (shipped method) | pseudo-mask | segmenter (FP32 ONNX)."""
    import numpy as np

    from .data.images import load_mask
    from .data.palette import IGNORE_INDEX
    from .data.voc import VOCDataset
    from .runtime.backends import open_runner
    from .runtime.processing import stack_batch
    from .train.cams import infer_cams
    from .train.pseudo import load_cam_run
    from .visualize import blend, gallery, heatmap, overlay_mask

    ship = cfg.ship_method
    dataset = VOCDataset(data_dir, cfg.train_split)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    net, _, _ = load_cam_run(out / ship)
    images = [s.load_image() for s in samples]
    rows = []
    with open_runner(str(out / "export" / "segmenter.onnx"), "onnxruntime") as runner:
        for sample, image in zip(samples, images, strict=True):
            cams = infer_cams(net, image[None], sample.labels[None], scales=(1.0,))[0]
            labels = runner.infer({"image": stack_batch([image])})["labels"][0]
            gt, pseudo = sample.load_mask(), load_mask(out / f"pseudo_{ship}" / f"{sample.id}.png")
            rows.append([image, overlay_mask(image, np.where(gt == IGNORE_INDEX, 0, gt)),
                         blend(image, heatmap(cams.max(0)), 0.6),
                         overlay_mask(image, np.where(pseudo == IGNORE_INDEX, 0, pseudo)),
                         overlay_mask(image, labels.astype(np.uint8))])
    picture = gallery(rows)
    atomic_write(out / "examples.png", lambda tmp: picture.save(tmp, format="PNG"))


def _latency_plot(report: dict, path: Path) -> None:
    """Latency (batch 1, p50) against val mIoU for each shipped model: the deployment trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for row in report["bench"]:
        if row["batch"] != 1:
            continue
        miou = report["seg_val_miou"]
        for cal in report["calibration"].values():
            if cal.get("output") and Path(row["model"]).name == cal["output"]:
                miou = cal["miou_int8"]
        label = f"{Path(row['model']).name} ({row['precision']})"
        points.append((row["p50_ms"], miou, label))
    fig, ax = plt.subplots(figsize=(6, 4))
    for ms, miou, label in points:
        ax.scatter(ms, miou)
        ax.annotate(label, (ms, miou), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("p50 latency, batch 1 (ms, ONNX Runtime CPU)")
    ax.set_ylabel("val mIoU")
    ax.set_title("latency vs mIoU of the shipped segmenter")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def reproduction_checks(methods: dict, seg_val_miou: float | None, seg_val_miou_gt_trained: float | None,
                        calibration: dict | None = None) -> dict:
    """What one run says about the papers' claims: numbers, not verdicts (:mod:`promptseg.claims`).

    ``differences``: each claim's difference on this run (one seed); POLE's share of changed prompts,
    how far SemPLeS moved its generator's masks, the segmenter's gap to ground truth and the INT8 gates.
    A check whose methods did not run, or whose numbers the data cannot give, is left out."""
    from .claims import one_run_differences

    checks: dict = {"differences": one_run_differences(methods)}
    if "prompt_changed_share" in methods.get("pole", {}):
        checks["pole_prompt_changed_share"] = methods["pole"]["prompt_changed_share"]
    if "mask_change_share" in methods.get("semples", {}):
        checks["semples_mask_change_share"] = methods["semples"]["mask_change_share"]
    if seg_val_miou is not None and seg_val_miou_gt_trained is not None:
        checks["segmenter_gap_to_ground_truth"] = seg_val_miou_gt_trained - seg_val_miou
    for target, cal in (calibration or {}).items():
        checks[f"int8_gate_{target}"] = bool(cal["gate_passed"])
    return checks


def render_markdown(report: dict) -> str:
    """A paper-style report of one pipeline run."""
    lines = [f"# promptseg run (seed {report['seed']})", ""]
    if "clip_zero_shot_map" in report:
        lines += [f"Tiny CLIP zero-shot multi-label mAP (val): {report['clip_zero_shot_map']:.3f}", ""]
    if report.get("clip_object_over_context"):
        shares = ", ".join(f"{name} {share:.0%}" for name, share in report["clip_object_over_context"].items())
        lines += [f"Tiny CLIP prefers the object alone to its context alone (val pairs): {shares}. Where it prefers "
                  "the context, the CLIP-guided losses pull CAMs onto it.", ""]
    if report.get("cam_backbone"):
        lines += [f"CAM network backbone: {report['cam_backbone']}.", ""]
    lines += ["## Methods", "",
              "| method | CAM mIoU (train) | context leak | pseudo-mask mIoU (train) | segmenter val mIoU | "
              "oracle CAM mIoU |", "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def cell(value, fmt=".1f"):
        return "—" if value is None else format(value, fmt)

    for method, row in report["methods"].items():
        lines.append(f"| {method} | {cell(row['cam_miou'])} | {cell(row['context_leak'], '.3f')} | "
                     f"{cell(row.get('pseudo_mask_miou'))} | {cell(row.get('seg_val_miou'))} | "
                     f"{cell(row['oracle_cam_miou'])} |")
    lines.append(f"| segmenter on ground truth | | | | {cell(report['seg_val_miou_gt_trained'])} | |")
    if "prompt_changed_share" in report["methods"].get("pole", {}):
        lines += ["", f"POLE chose a name other than the class name for "
                      f"{report['methods']['pole']['prompt_changed_share']:.1%} of (image, class) pairs."]
    lines += ["", "CAM mIoU: CAMs at 4 scales with flips (as the references score them), the background threshold",
              "chosen on the val split; the oracle column picks it on the scored labels themselves and is not",
              "a result. Context leak: the share of CAM foreground that falls on the class's co-occurring",
              "context (lower is better).",
              "Pseudo-masks: " + ("dense CRF over the CAMs, its background level chosen on the val split."
                                  if report.get("pseudo_mask_crf") else
                                  "CAMs at the val-chosen threshold, no CRF (install the crf extra for it)."), "",
              f"Shipped: the {report['ship_method']} segmenter.", "", "## Export parity (PyTorch vs ONNX Runtime, "
              "val images)", "", "| file | max abs diff | label agreement | gate |", "| --- | ---: | ---: | --- |"]
    for name, entry in report["export"].items():
        lines.append(f"| {name} | {entry['max_abs_diff']:.2e} | {100 * entry['label_agreement']:.3f}% | "
                     f"{entry['parity']} |")
    lines += ["", "## INT8 (held-out val images)", "",
              "| target | model kept | mIoU FP32 | mIoU INT8 | drop | label agreement | gate |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for target, cal in report["calibration"].items():
        lines.append(f"| {target} | {cal['chosen'] or '—'} | {cell(cal['miou_fp32'], '.2f')} | "
                     f"{cell(cal['miou_int8'], '.2f')} | {cell(cal['miou_drop'], '.2f')} | "
                     f"{cell(None if cal['label_agreement'] is None else 100 * cal['label_agreement'], '.2f')}% | "
                     f"{'passed' if cal['gate_passed'] else 'FAILED'} |")
    notes = [f"- {t}: {c['note']}" for t, c in report["calibration"].items() if c.get("note")]
    lines += ["", *notes, "", "## Latency (ONNX Runtime, CPU)", "",
              "| model | precision | batch | p50 ms | p99 ms | images/s | cold start s | peak RSS MB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["bench"]:
        lines.append(f"| {Path(row['model']).name} | {row['precision']} | {row['batch']} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['throughput']:.0f} | {row['cold_start_s']:.2f} | "
                     f"{cell(row['peak_rss_mb'], '.0f')} |")
    if report.get("checks"):
        from .claims import describe

        checks = report["checks"]
        lines += ["", "## The papers' claims on this run (one seed)", "",
                  "Differences between methods of this run. One seed proves nothing (the same seed moved CLIMS "
                  "by 8 points between two 2-core machines): `bench/methods_cpu.py` pairs them over seeds and says "
                  "which claims hold.", "",
                  *[f"- {describe(name, row)}" for name, row in checks["differences"].items()]]
        if "pole_prompt_changed_share" in checks:
            lines.append(f"- POLE chose another name than the class's for {checks['pole_prompt_changed_share']:.1%} "
                         "of (image, class) pairs")
        if "semples_mask_change_share" in checks:
            lines.append(f"- SemPLeS changed {checks['semples_mask_change_share']:.1%} of the train pixels' "
                         "pseudo-mask labels of its generator")
        if "segmenter_gap_to_ground_truth" in checks:
            lines.append(f"- the segmenter trained on pseudo-masks is {checks['segmenter_gap_to_ground_truth']:.1f} "
                         "mIoU below the one trained on ground truth")
        lines += [f"- INT8 gate ({name.removeprefix('int8_gate_')}): {'passed' if ok else 'FAILED'}"
                  for name, ok in checks.items() if name.startswith("int8_gate_")]
    if report.get("throughput"):
        machine = report.get("machine", {})
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in machine.get("peak_gflops", {}).items())
        units = "with" if machine.get("cpu_bf16_units") else "without"
        lines += ["", "## Throughput of the training and CAM stages", "",
                  f"CPU {machine.get('cpu_capability')} {units} bf16 units"
                  f", {machine.get('threads')} threads; matmul peak measured at the start of the run (GFLOP/s): "
                  f"{peaks}. FLOPs counted by PyTorch's FLOP counter (training: one step of each run, forward and "
                  "backward; CAMs: every batch).", "",
                  "| stage | precision | images/s | GFLOP/s | share of peak |", "| --- | --- | ---: | ---: | ---: |"]
        for stage, row in report["throughput"].items():
            share = "—" if row.get("peak_share") is None else f"{100 * row['peak_share']:.0f}%"
            lines.append(f"| {stage} | {row.get('amp') or 'fp32'} | {row['images_per_s']:.0f} | "
                         f"{row['gflops_per_s']:.1f} | {share} |")
    lines += ["", "![latency vs mIoU](latency_vs_miou.png)", "",
              "Examples (image | ground truth | CAM | pseudo-mask | segmenter): ![examples](examples.png)", "",
              "Stage times (s, as each stage ran; a rerun keeps finished stages): "
              + ", ".join(f"{k} {cell(v)}" for k, v in report["timings_s"].items()),
              f"Total: {report['total_s']} s ({report['total_s'] / 60:.1f} min)", ""]
    return "\n".join(lines)
