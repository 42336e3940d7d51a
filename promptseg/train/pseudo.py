"""From a trained CAM run to pseudo-masks on disk (VOC palette PNGs) and their scores.

A pseudo-mask pixel is background where the strongest class map is below ``low``, the argmax
class where it reaches ``high``, and 255 (ignored by the segmenter's loss) in between. With
``low == high`` every pixel gets a label. Optional dense-CRF refinement uses ``pydensecrf``
(``pip install promptseg[crf]``, built from source) with CLIMS's pairwise settings; its background
level is chosen on the held-out val split, never on the labels it is scored on. promptseg never
pretends the CRF ran when it did not.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import load_mask, mask_to_png_image
from ..data.palette import IGNORE_INDEX
from ..data.voc import VOCDataset
from ..errors import ConfigError, PromptsegError
from ..eval import ConfusionMatrix, ContextLeak
from ..io import read_json, write_bytes_atomic, write_json_atomic
from ..runtime.processing import cams_to_mask
from .cam_net import CamNet, CamNetConfig
from .cams import CamScores, infer_cams
from .checkpoint import load_checkpoint
from .hardware import Throughput, precision_facts, resolve_amp, resolve_channels_last


@dataclass(frozen=True)
class PseudoMaskConfig:
    cam_run: str  # a `promptseg train cam` run directory
    out: str
    split: str = "train"
    low: float | None = None  # None: the run's background threshold, or with crf the best CRF level on val
    high: float | None = None  # None: same as low (no ignore band)
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    crf: bool = False
    batch_size: int = 64
    workers: int = 2  # processes running the dense CRF (it is single-threaded C++)
    amp: bool | None = None  # bf16 CAM inference; None: where the CPU has bf16 units
    channels_last: bool | None = None
    # another run's pseudo-mask folder (SemPLeS: its generator's): the report gives `mask_change_share`,
    # the share of pixels whose label differs from it
    compare_to: str | None = None

    def validate(self) -> None:
        if self.low is not None and self.high is not None and self.high < self.low:
            raise ConfigError(f"high: got {self.high} | expected >= low ({self.low})")
        if self.workers < 1:
            raise ConfigError(f"workers: got {self.workers} | expected >= 1")


def load_cam_run(run: str | Path) -> tuple[CamNet, dict, dict]:
    """The CAM network of a run directory (eval mode), its config and its report."""
    from ..configs import from_dict

    run = Path(run)
    config = read_json(run / "config.json")
    report = read_json(run / "report.json")
    state = load_checkpoint(run / "cam_net.pt")
    net = CamNet(from_dict(CamNetConfig, config["net"], where=f"{run}/config.json net"), state["num_classes"])
    net.load_state_dict(state["net"])
    return net.eval(), config, report


CRF_BACKGROUND_LEVELS = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8, searched on val


def crf_available() -> bool:
    """Whether ``pydensecrf`` imports (the ``crf`` extra)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _require_crf() -> None:
    if not crf_available():
        raise PromptsegError("dense CRF asked for, but pydensecrf is not installed "
                             "(pip install 'promptseg[crf]'); rerun without --crf")


def refine_with_crf(image: np.ndarray, cams: np.ndarray, low: float) -> np.ndarray:
    """Dense CRF over [background, present classes] probabilities (CLIMS: unary from the maps,
    gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, 10 iterations).

    ``image``: ``H x W x 3`` uint8 RGB; ``cams``: ``C x H x W`` in 0..1, all zero for classes the
    image is not labelled with (left out of the CRF, as the references keep only the image's keys);
    ``low``: the constant background map. Returns ``H x W`` uint8 ids (0 = background)."""
    _require_crf()
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    height, width = image.shape[:2]
    keys = np.flatnonzero(cams.reshape(len(cams), -1).max(1) > 0)
    if not len(keys):
        return np.zeros((height, width), np.uint8)
    probs = np.concatenate([np.full((1, height, width), low, np.float32), cams[keys]]) + 1e-5
    probs /= probs.sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(width, height, probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    labels = np.argmax(np.array(crf.inference(10)).reshape(-1, height, width), 0)
    return np.concatenate([[0], keys + 1]).astype(np.uint8)[labels]


CrfMap = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], float], list[np.ndarray]]


@contextmanager
def crf_runner(workers: int) -> Iterator[CrfMap]:
    """``run(images, cams, low) -> masks``: :func:`refine_with_crf` over a batch, in ``workers``
    processes when more than one (the CRF holds no lock to release, so threads would not help)."""
    _require_crf()
    if workers == 1:
        yield lambda images, cams, low: [refine_with_crf(i, c, low) for i, c in zip(images, cams, strict=True)]
        return
    with ProcessPoolExecutor(workers) as pool:
        yield lambda images, cams, low: list(pool.map(refine_with_crf, images, cams, [low] * len(images),
                                                      chunksize=max(len(images) // (4 * workers), 1)))


def score_val(net: CamNet, dataset: VOCDataset, scales: tuple[float, ...], run_crf: CrfMap | None = None,
              levels: tuple[float, ...] = CRF_BACKGROUND_LEVELS, batch_size: int = 64,
              show_progress: bool = False, **cam_options) -> dict:
    """One pass over a held-out split with masks: the CAMs' best background threshold and, with
    ``run_crf``, the CRF background level with the best mIoU (all ``levels`` at once: CAMs of a real
    val split do not fit in memory, and CAM inference costs more than a few more CRFs).

    Returns ``{"cam_threshold": t, "cam_val_miou": mIoU at t, "crf_level": level or None,
    "crf_val_miou": {level: mIoU} or None}``."""
    from tqdm import tqdm

    from .cam_train import same_size_chunks

    cam_scores = CamScores(dataset.num_classes)
    matrices = {level: ConfusionMatrix(dataset.num_classes + 1) for level in levels} if run_crf else {}
    for chunk in tqdm(list(same_size_chunks(dataset, batch_size)), desc="CAM thresholds and CRF levels on val",
                      disable=not show_progress):
        images = np.stack([s.load_image() for s in chunk])
        cams = infer_cams(net, images, np.stack([s.labels for s in chunk]), scales, **cam_options)
        truths = [sample.load_mask() for sample in chunk]
        for sample_cams, gt in zip(cams, truths, strict=True):
            cam_scores.update(sample_cams, gt, None)
        for level, matrix in matrices.items():
            for mask, gt in zip(run_crf(images, cams, level), truths, strict=True):
                matrix.update(mask, gt)
    cam = cam_scores.report()
    crf = {level: 100 * m.miou() for level, m in matrices.items()}
    return {"cam_threshold": cam["oracle_background_threshold"], "cam_val_miou": cam["oracle_cam_miou"],
            "crf_level": max(crf, key=crf.get) if crf else None,
            "crf_val_miou": {str(k): crf[k] for k in sorted(crf)} if crf else None}


def make_pseudo_masks(cfg: PseudoMaskConfig, *, show_progress: bool = True) -> dict:
    """Write ``out/<id>.png`` for every image of ``cfg.split`` and ``out/report.json``.

    The report also scores the CAMs themselves at ``cam_scales`` (the references' CAM mIoU: 4 scales
    with flips), their background threshold chosen on the run's held-out split when it has masks.
    """
    from tqdm import tqdm

    from .cam_train import same_size_chunks

    cfg.validate()
    net, run_config, run_report = load_cam_run(cfg.cam_run)
    dataset = VOCDataset(run_config["data"], cfg.split)
    val_split = run_config.get("val_split")
    held_out = VOCDataset(run_config["data"], val_split) if val_split else None
    device = next(net.parameters()).device
    amp_dtype, channels_last = resolve_amp(cfg.amp, device), resolve_channels_last(cfg.channels_last)
    throughput = Throughput()
    cam_options = {"channels_last": channels_last, "amp_dtype": amp_dtype, "throughput": throughput}
    throughput.start()
    with crf_runner(cfg.workers) if cfg.crf else nullcontext() as run_crf:
        val = None
        if held_out is not None and held_out.has_masks:
            val = score_val(net, held_out, cfg.cam_scales, run_crf, batch_size=cfg.batch_size,
                            show_progress=show_progress, **cam_options)
            cam_threshold, cam_source = val["cam_threshold"], f"best on {val_split}"
        else:
            cam_threshold, cam_source = float(run_report["background_threshold"]), "the CAM run's threshold"
        low, low_source = cfg.low, "given"
        if low is None and cfg.crf and val is not None:
            low, low_source = val["crf_level"], f"best CRF level on {val_split}"
        elif low is None:
            low, low_source = cam_threshold, f"the CAM threshold ({cam_source})"
        high = cfg.high if cfg.high is not None else low
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        matrix = ConfusionMatrix(dataset.num_classes + 1)
        leak = ContextLeak(dataset.num_classes)
        cam_scores = CamScores(dataset.num_classes, threshold=cam_threshold)
        has_gt = has_context = True
        ignored = total = changed = 0
        for chunk in tqdm(list(same_size_chunks(dataset, cfg.batch_size)), desc="pseudo-masks",
                          disable=not show_progress):
            images = np.stack([s.load_image() for s in chunk])
            cams = infer_cams(net, images, np.stack([s.labels for s in chunk]), cfg.cam_scales, **cam_options)
            masks = run_crf(images, cams, low) if cfg.crf else [cams_to_mask(c, low) for c in cams]
            for sample, mask, sample_cams in zip(chunk, masks, cams, strict=True):
                if high > low:
                    peak = sample_cams.max(0)
                    mask[(peak >= low) & (peak < high)] = IGNORE_INDEX
                buf = io.BytesIO()
                mask_to_png_image(mask).save(buf, format="PNG")
                write_bytes_atomic(out / f"{sample.id}.png", buf.getvalue())
                ignored += int((mask == IGNORE_INDEX).sum())
                total += mask.size
                if cfg.compare_to is not None:
                    changed += int((load_mask(Path(cfg.compare_to) / f"{sample.id}.png") != mask).sum())
                if sample.mask_path is None:
                    has_gt = False
                    continue
                gt = sample.load_mask()
                context = sample.load_context() if sample.context_path is not None else None
                cam_scores.update(sample_cams, gt, context)
                matrix.update(np.where(mask == IGNORE_INDEX, 0, mask), gt)
                if context is not None:
                    leak.update(np.where(gt == IGNORE_INDEX, IGNORE_INDEX, mask), context)
                else:
                    has_context = False
    throughput.stop()
    cams_report = cam_scores.report() if has_gt else {}
    report = {
        "method": run_report.get("method"),
        "seed": run_report.get("seed"),
        "cam_run": str(cfg.cam_run),
        "cam_scales": list(cfg.cam_scales),
        "cam_threshold": cam_threshold, "cam_threshold_source": cam_source,
        **({"cam_val_miou": val["cam_val_miou"]} if val else {}),
        "cam_miou": cams_report.get("cam_miou"),
        "cam_per_class_iou": cams_report.get("cam_per_class_iou"),
        "context_leak": cams_report.get("context_leak"),
        "context_leak_per_class": cams_report.get("context_leak_per_class"),
        "oracle_cam_miou": cams_report.get("oracle_cam_miou"),
        "oracle_cam_threshold": cams_report.get("oracle_background_threshold"),
        "cam_run_cam_miou": run_report.get("cam_miou"),  # the CAM run's own check, at its cam_scales
        "low": low, "high": high, "low_source": low_source, "crf": cfg.crf,
        **({"crf_val_miou": val["crf_val_miou"]} if val and val["crf_val_miou"] else {}),
        "pseudo_mask_miou": 100 * matrix.miou() if has_gt else None,
        "pseudo_mask_per_class_iou": (matrix.summary(("background", *dataset.class_names), percent=True)
                                      ["per_class_iou"] if has_gt else None),
        "pseudo_mask_context_leak": float(leak.overall()) if has_gt and has_context else None,
        "ignored_share": ignored / max(total, 1),
        **({"mask_change_share": changed / max(total, 1), "compared_to": cfg.compare_to} if cfg.compare_to else {}),
        "images": len(dataset),
        **precision_facts(amp_dtype, channels_last),
        "throughput": throughput.report(),  # val and train images, CRF and PNG writing included
    }
    write_json_atomic(out / "config.json", cfg)
    write_json_atomic(out / "report.json", report)
    return report


def save_cams(cam_run: str | Path, out: str | Path, split: str = "train",
              scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0), batch_size: int = 64) -> int:
    """Write ``out/<id>.npy`` (``C x H x W`` float16 CAMs in 0..1) for every image of ``split``."""
    from .cam_train import same_size_chunks

    net, run_config, _ = load_cam_run(cam_run)
    dataset = VOCDataset(run_config["data"], split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for chunk in same_size_chunks(dataset, batch_size):
        cams = infer_cams(net, np.stack([s.load_image() for s in chunk]), np.stack([s.labels for s in chunk]), scales)
        for sample, sample_cams in zip(chunk, cams, strict=True):
            buf = io.BytesIO()
            np.save(buf, sample_cams.astype(np.float16))
            write_bytes_atomic(out / f"{sample.id}.npy", buf.getvalue())
    return len(dataset)
