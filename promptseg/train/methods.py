"""The CLIP-guided CAM methods: CLIMS, POLE and SemPLeS (losses in :mod:`.losses`).

All three share one mechanism: for every present class k of a crop X, the class map P_k masks
the image into fg_k = P_k * X and bg_k = (1 - P_k) * X, a frozen CLIP embeds both (gradients flow
through CLIP's image tower into the CAM network), and losses compare them with text features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, PromptsegError
from ..io import read_json, write_json_atomic
from . import losses
from .cam_net import CamNet
from .cam_train import CamCrops, CamTrainer, scheduled_lr, seed_everything
from .cams import imagenet_normalise, infer_cams
from .checkpoint import load_checkpoint, save_checkpoint
from .clip import ClipSpec, clip_input_size, clip_normalize, encode_prompts
from .config import POLE_SELECTION_SCALES, VOC_CLIP_WORDS, CamTrainConfig
from .distributed import setup
from .prompts import CLASS_TEMPLATE, BackgroundPrompts, ClipAdapter


def resize_to(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size`` with ``align_corners=True``, as the references resize for CLIP."""
    if maps.shape[-2:] == (size, size):
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)


def reference_view(images01: torch.Tensor, size: int) -> torch.Tensor:
    """The image the references mask for CLIP: the ImageNet-normalised crop at CLIP's input size."""
    return imagenet_normalise(resize_to(images01, size))


def default_class_words(class_names) -> tuple[str, ...]:
    """The words for "a photo of {}.": the references' for VOC ("player", "dining table", ...), else the names."""
    from ..data.voc import VOC_CLASSES

    return VOC_CLIP_WORDS if tuple(class_names) == VOC_CLASSES else tuple(class_names)


def _baseline_weights(path: str) -> dict:
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "cam_net.pt"
    return load_checkpoint(candidate)["net"]


class ClipGuidedTrainer(CamTrainer):
    """CLIMS: L = w_otm L_OTM + w_btm L_BTM + w_cbs L_CBS + w_reg L_REG on sigmoid class maps."""

    def __init__(self, cfg: CamTrainConfig):
        super().__init__(cfg)
        if cfg.guidance is None:
            raise ConfigError(f"method {cfg.method}: needs the `guidance` section (CLIP, weights)")
        self.guide = cfg.guidance
        if self.guide.init_from:
            self.net.load_cam_weights(_baseline_weights(self.guide.init_from))
        self.clip, self.tokenizer = ClipSpec(self.guide.clip_model, self.guide.clip_pretrained).load()
        self.clip_size = clip_input_size(self.clip)
        words = self.guide.class_words or default_class_words(self.dataset.class_names)
        if len(words) != self.dataset.num_classes:
            raise ConfigError(f"class_words: got {len(words)} words | expected {self.dataset.num_classes} "
                              f"({', '.join(self.dataset.class_names)})")
        self.class_text = self.prompt_features(self.guide.class_template, words)
        self.background_text = self.prompt_features(self.guide.background_template, self.guide.background_words)
        self.cbs_threshold = self.guide.cbs_threshold
        if self.cbs_threshold is None:
            self.cbs_threshold = self._calibrate_cbs_threshold()

    def trains_backbone(self) -> bool:
        return self.guide.train_backbone

    def place(self, runtime) -> None:
        super().place(runtime)
        self.clip.to(runtime.device)
        self.class_text = self.class_text.to(runtime.device)
        self.background_text = self.background_text.to(runtime.device)

    # -- shared pieces
    def prompt_features(self, template: str, words) -> torch.Tensor:
        return encode_prompts(self.clip, self.tokenizer, [template.format(w) for w in words])

    def class_maps(self, cams: torch.Tensor) -> torch.Tensor:
        """CLIMS's class maps: sigmoid of the CAMs, at the CAMs' resolution (L_REG averages these)."""
        return torch.sigmoid(cams)

    def clip_maps(self, cams: torch.Tensor) -> torch.Tensor:
        """The masks at CLIP's input size: the class maps resized (bilinear, align_corners=True, as CLIMS)."""
        return resize_to(self.class_maps(cams), self.clip_size)

    def masked_views(self, images01: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor):
        """fg_k and bg_k for every (image, present class) of CAMs ``cams``: ``N x 3 x S x S`` each, plus
        the indices."""
        return self.views_from_maps(images01, self.clip_maps(cams), labels)

    def views_from_maps(self, images01: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor):
        """P_k * X and (1 - P_k) * X with X the ImageNet-normalised crop at CLIP's size, fed to CLIP as it is
        (the references' views: CLIP's own mean/std are not applied); ``maps`` at any size are resized."""
        x = reference_view(images01, self.clip_size)
        maps = resize_to(maps, self.clip_size)
        b_idx, k_idx = torch.nonzero(labels > 0, as_tuple=True)
        p = maps[b_idx, k_idx][:, None]
        return p * x[b_idx], (1 - p) * x[b_idx], b_idx, k_idx

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(views), dim=-1)

    def embed_views(self, images01, cams, labels):
        """Class maps, CLIP features of every fg_k and bg_k (one CLIP pass), and the (image, class) indices."""
        fg, bg, b_idx, k_idx = self.masked_views(images01, cams, labels)
        feats = self.encode_images(torch.cat([fg, bg]))
        return self.class_maps(cams), feats[: len(fg)], feats[len(fg):], b_idx, k_idx

    def matching_terms(self, fg_f, bg_f, text) -> dict[str, torch.Tensor]:
        """w_otm L_OTM + w_btm L_BTM: the object looks like its text, what is left out does not."""
        return {"otm": self.guide.w_otm * losses.object_text_matching(fg_f, text),
                "btm": self.guide.w_btm * losses.background_text_matching(bg_f, text)}

    def suppression_terms(self, fg_f, maps) -> dict[str, torch.Tensor]:
        """w_cbs L_CBS (fixed background prompts) + w_reg L_REG, where their weights are non-zero."""
        terms = {}
        if self.guide.w_cbs:
            terms["cbs"] = self.guide.w_cbs * losses.class_background_suppression(
                fg_f, self.background_text, self.cbs_threshold)
        if self.guide.w_reg:
            terms["reg"] = self.guide.w_reg * losses.area_regularisation(maps)
        return terms

    @torch.no_grad()
    def _calibrate_cbs_threshold(self, max_images: int = 256) -> float:
        """The quantile of whole training images' similarity to the background prompts, seen as the
        losses see images (one at a time: a real dataset's sizes differ)."""
        views = [reference_view(torch.tensor(self.dataset[i].load_image()).permute(2, 0, 1)[None].float()
                                / 255.0, self.clip_size) for i in range(min(len(self.dataset), max_images))]
        sims = self.encode_images(torch.cat(views)) @ self.background_text.T
        return float(torch.quantile(sims.flatten(), self.guide.cbs_quantile))

    # -- the loss
    def method_loss(self, images01, cams, labels, rows):
        maps, fg_f, bg_f, _, k_idx = self.embed_views(images01, cams, labels)
        return {**self.matching_terms(fg_f, bg_f, self.class_text[k_idx]), **self.suppression_terms(fg_f, maps)}

    def run_facts(self) -> dict:
        return {"cbs_threshold": self.cbs_threshold,
                "cbs_threshold_source": "fixed" if self.guide.cbs_threshold is not None
                else f"quantile {self.guide.cbs_quantile} of image/background similarities",
                "background_words": list(self.guide.background_words)}


# ----------------------------------------------------------------------------- POLE


def load_candidates(cfg: CamTrainConfig, class_names: tuple[str, ...]) -> dict[str, list[str]]:
    """Candidate names per class (canonical first): a user JSON file or the world's classes.json."""
    path = Path(cfg.guidance.candidates) if cfg.guidance.candidates else Path(cfg.data) / "classes.json"
    data = read_json(path)
    table = data.get("synonyms", data) if not cfg.guidance.candidates else data
    missing = [c for c in class_names if c not in table]
    if missing:
        raise ConfigError(f"{path}: no candidate names for classes {missing}")
    return {c: [str(n) for n in table[c]] for c in class_names}


class PoleTrainer(ClipGuidedTrainer):
    """POLE: CLIMS with the per-image chosen class name and CLIP-Adapters on both embeddings."""

    def __init__(self, cfg: CamTrainConfig):
        super().__init__(cfg)
        self.choices_path = self.out / "prompt_choices.json"
        dim = self.class_text.shape[1]
        self.image_adaptor, self.text_adaptor = ClipAdapter(dim), ClipAdapter(dim)
        self.candidates = load_candidates(cfg, self.dataset.class_names)
        # chosen afresh on every start, resume included (deterministic, one CLIP pass): a file left by
        # an earlier run in this folder may come from another CLIP or starting network
        self.choices = select_prompts(self.net, self.clip, self.tokenizer, self.dataset, self.candidates,
                                      self.guide.class_template, scales=self.guide.selection_scales)
        write_json_atomic(self.choices_path, {"candidates": self.candidates, "choices": self.choices})
        names = sorted({n for names in self.candidates.values() for n in names})
        self.name_index = {n: i for i, n in enumerate(names)}
        self.name_text = self.prompt_features(self.guide.class_template, names)
        ids = self.dataset.ids
        table = torch.zeros(len(ids), self.dataset.num_classes, dtype=torch.long)
        for row, image_id in enumerate(ids):
            for k, cls in enumerate(self.dataset.class_names):
                table[row, k] = self.name_index[self.choices.get(image_id, {}).get(cls, self.candidates[cls][0])]
        self.choice_table = table

    def place(self, runtime) -> None:
        super().place(runtime)
        for module in (self.image_adaptor, self.text_adaptor):
            module.to(runtime.device)
        self.name_text = self.name_text.to(runtime.device)
        self.choice_table = self.choice_table.to(runtime.device)

    def extra_parameters(self) -> list[dict]:
        lr = self.cfg.lr * self.guide.adaptor_lr_mult
        return [{"params": list(self.image_adaptor.parameters()) + list(self.text_adaptor.parameters()),
                 "lr": lr, "base_lr": lr}]

    def extra_state(self) -> dict:
        return {"image_adaptor": self.image_adaptor.state_dict(), "text_adaptor": self.text_adaptor.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.image_adaptor.load_state_dict(state["image_adaptor"])
            self.text_adaptor.load_state_dict(state["text_adaptor"])

    def method_loss(self, images01, cams, labels, rows):
        maps, fg_raw, bg_raw, b_idx, k_idx = self.embed_views(images01, cams, labels)
        text = self.text_adaptor(self.name_text[self.choice_table[rows[b_idx], k_idx]])
        terms = self.matching_terms(self.image_adaptor(fg_raw), self.image_adaptor(bg_raw), text)
        return {**terms, **self.suppression_terms(fg_raw, maps)}  # adaptors are not used in L_CBS

    def run_facts(self) -> dict:
        total = changed = 0
        for per_image in self.choices.values():
            for cls, name in per_image.items():
                total += 1
                changed += name != self.candidates[cls][0]
        return {**super().run_facts(), "prompt_choices": str(self.choices_path),
                "prompt_changed_share": changed / max(total, 1)}


@torch.inference_mode()
def select_prompts(net: CamNet, clip, tokenizer, dataset, candidates: dict[str, list[str]],
                   template: str = CLASS_TEMPLATE, batch_size: int = 64,
                   scales: tuple[float, ...] = POLE_SELECTION_SCALES) -> dict[str, dict[str, str]]:
    """POLE step A: per (image, present class), the candidate name CLIP finds most correlated with
    the image masked by the class's CAM (multi-scale with flips, as the reference's make_cam; RGB x
    CAM), by softmax(100 * cos) over the candidates."""
    from .cam_train import same_size_chunks

    net.eval()
    size = clip_input_size(clip)
    text = {cls: encode_prompts(clip, tokenizer, [template.format(n) for n in names])
            for cls, names in candidates.items()}
    choices: dict[str, dict[str, str]] = {}
    for chunk in same_size_chunks(dataset, batch_size):
        images = np.stack([s.load_image() for s in chunk])
        labels = np.stack([s.labels for s in chunk])
        cams = torch.from_numpy(infer_cams(net, images, labels, scales=scales))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        rows, ks = np.nonzero(labels > 0)  # every (image, present class) of the chunk: one CLIP pass
        masked = x[rows] * cams[rows, ks][:, None]
        feats = F.normalize(clip.encode_image(clip_normalize(masked, size)), dim=-1)
        for sample in chunk:
            choices[sample.id] = {}
        for feat, row, k in zip(feats, rows, ks, strict=True):
            cls = dataset.class_names[k]
            probs = (100 * feat @ text[cls].T).softmax(-1)
            choices[chunk[row].id][cls] = candidates[cls][int(probs.argmax())]
    return choices


# ----------------------------------------------------------------------------- SemPLeS


def minmax_maps(cams: torch.Tensor, eps: float) -> torch.Tensor:
    """SemPLeS masks: (x - min) / (max - min + eps) per map."""
    flat = cams.flatten(2)
    low = flat.amin(2)[..., None, None]
    high = flat.amax(2)[..., None, None]
    return (cams - low) / (high - low + eps)


def semples_masks(cams: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """SemPLeS's masks as the reference makes them: the non-negative CAM (its ReLU sits in WeakTr)
    upsampled to CLIP's size (bilinear, align_corners=True), then min-maxed with the stage's epsilon."""
    return minmax_maps(resize_to(F.relu(cams), size), eps)


class SemplesSegmentLabelTrainer(ClipGuidedTrainer):
    """SemPLeS stage (a), segment-label matching: L_OTM + w_btm L_BTM on min-max masks (eps 0.1)."""

    mask_eps = 0.1  # stages (a) and (c); stage (b) uses 1e-4

    def class_maps(self, cams):
        return semples_masks(cams, self.clip_size, self.mask_eps)

    def clip_maps(self, cams):
        return self.class_maps(cams)

    def method_loss(self, images01, cams, labels, rows):
        _, fg_f, bg_f, _, k_idx = self.embed_views(images01, cams, labels)
        return self.matching_terms(fg_f, bg_f, self.class_text[k_idx])


class SemplesRefineTrainer(SemplesSegmentLabelTrainer):
    """SemPLeS stage (c): stage (a)'s losses + w_refine * -mean log(1 - s(fg_k, p_k)), prompts frozen."""

    def __init__(self, cfg: CamTrainConfig):
        super().__init__(cfg)
        if not self.guide.prompts_from:
            raise ConfigError("semples stage c: guidance.prompts_from must name the stage (b) run")
        state = load_text_features(self.guide.prompts_from)
        if list(state["class_names"]) != list(self.dataset.class_names):
            raise PromptsegError(f"{self.guide.prompts_from}: prompts learned for classes {state['class_names']} | "
                                 f"expected {list(self.dataset.class_names)}")
        self.prompt_text = state["text_features"]

    def place(self, runtime) -> None:
        super().place(runtime)
        self.prompt_text = self.prompt_text.to(runtime.device)

    def method_loss(self, images01, cams, labels, rows):
        _, fg_f, bg_f, _, k_idx = self.embed_views(images01, cams, labels)
        refine = self.guide.w_refine * losses.prompt_guided_suppression(fg_f, self.prompt_text[k_idx])
        return {**self.matching_terms(fg_f, bg_f, self.class_text[k_idx]), "refine": refine}


TEXT_FEATURES = "text_features.pt"


def load_text_features(run: str | Path) -> dict:
    """The folded prompt features of a stage (b) run: ``{"text_features": C x D, "class_names": [...]}``."""
    path = Path(run)
    return load_checkpoint(path / TEXT_FEATURES if path.is_dir() else path)


def learn_background_prompts(cfg: CamTrainConfig, *, show_progress: bool = True) -> dict:
    """SemPLeS stage (b): the CAM network (stage a) frozen, only the prompts learn (AdamW, wd 0.03, as
    the reference's main2; its epochs, batch, lr, schedule and crops from ``guidance.prompt_*``).

    Loss: -mean log s(bg_k, p_k) + w * mean log s(t_k, p_k) with masks min-max normalised (eps 1e-4).
    The learned prompts are folded once into constant ``C x D`` text features, ``text_features.pt``.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    runtime = setup(cfg.device, cfg.amp, cfg.channels_last)
    out = Path(cfg.out)
    if not runtime.is_main:  # prompts are small: rank 0 learns them, the others wait for the file
        runtime.barrier()
        return read_json(out / "report.json")
    trainer = SemplesSegmentLabelTrainer(cfg)  # loads CLIP, data and the stage-(a) network (init_from)
    trainer.mask_eps = 1e-4  # stage (b)'s epsilon
    trainer.place(runtime)
    trainer.net.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    guide = cfg.guidance
    prompts = BackgroundPrompts(trainer.clip, trainer.tokenizer, trainer.dataset.num_classes,
                                guide.prompt_length).to(runtime.device)
    optimizer = torch.optim.AdamW(prompts.parameters(), lr=guide.prompt_lr, weight_decay=0.03)
    batch_size = guide.prompt_batch_size or cfg.batch_size
    loader = DataLoader(CamCrops(trainer.dataset, cfg.crop, cfg.scale_range, guide.prompt_augment),
                        batch_size=batch_size, shuffle=True, drop_last=len(trainer.dataset) > batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(total=guide.prompt_epochs * len(loader), desc="semples prompts", disable=not show_progress)
    log = []
    for epoch in range(guide.prompt_epochs):
        for i, (images01, labels, _) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(guide.prompt_schedule, guide.prompt_lr, epoch * len(loader) + i,
                                           len(loader), guide.prompt_epochs)
            images01, labels = runtime.images(images01), labels.to(runtime.device)
            with torch.no_grad():
                _, bg, _, k_idx = trainer.masked_views(images01, trainer.net(imagenet_normalise(images01)), labels)
                bg_f = trainer.encode_images(bg)
            p = prompts(trainer.clip)
            loss = losses.prompt_contrast(bg_f, p[k_idx], trainer.class_text[k_idx], guide.w_prompt_text)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{log[-1]:.3f}")
    bar.close()
    with torch.no_grad():
        features = prompts(trainer.clip)
    save_checkpoint(out / "prompts.pt", {"embeddings": prompts.embeddings.detach().cpu(),
                                         "tokens": prompts.tokens.cpu()})
    features = features.cpu()
    save_checkpoint(out / TEXT_FEATURES, {"text_features": features, "class_names": list(trainer.dataset.class_names)})
    sims = features @ trainer.class_text.cpu().T
    report = {"method": "semples", "stage": "b", "seed": cfg.seed, "final_loss": float(np.mean(log[-10:])),
              "procedure": {"epochs": guide.prompt_epochs, "batch_size": batch_size, "lr": guide.prompt_lr,
                            "schedule": guide.prompt_schedule, "augment": guide.prompt_augment},
              "prompt_class_similarity": sims.diagonal().tolist(),
              "text_features": str(out / TEXT_FEATURES)}
    write_json_atomic(out / "report.json", report)
    runtime.barrier()
    return report


TRAINERS = {
    "clims": ClipGuidedTrainer,
    "pole": PoleTrainer,
    "semples_a": SemplesSegmentLabelTrainer,
    "semples_c": SemplesRefineTrainer,
}


def train_semples(cfg: CamTrainConfig, *, resume: bool = False, show_progress: bool = True) -> dict:
    """SemPLeS's three stages in ``out/stage_{a,b,c}``; the stage (c) report becomes ``out/report.json``.

    (a) segment-label matching from ``guidance.init_from``; (b) background prompts learned against
    the frozen stage-(a) network and folded to ``stage_b/text_features.pt``; (c) the CAM network
    restarted from the same initialisation as (a) and refined with the frozen prompts.
    """
    from dataclasses import replace

    from .cam_train import train_cam

    out = Path(cfg.out)
    stage_a = replace(cfg, method="semples_a", out=str(out / "stage_a"))
    report_a = train_cam(stage_a, resume=resume, show_progress=show_progress)
    stage_b = replace(cfg, method="semples_a", out=str(out / "stage_b"),
                      guidance=replace(cfg.guidance, init_from=str(out / "stage_a")))
    report_b = learn_background_prompts(stage_b, show_progress=show_progress)
    stage_c = replace(cfg, method="semples_c", out=str(out / "stage_c"),
                      guidance=replace(cfg.guidance, prompts_from=str(out / "stage_b")))
    report_c = train_cam(stage_c, resume=resume, show_progress=show_progress)
    if not report_c:  # a torchrun process other than rank 0: rank 0 writes the run's files
        return {}
    report = {**report_c, "method": "semples", "stage_a": {k: report_a[k] for k in ("cam_miou", "context_leak")},
              "prompt_class_similarity": report_b["prompt_class_similarity"],
              "text_features": report_b["text_features"]}
    save_checkpoint(out / "cam_net.pt", load_checkpoint(out / "stage_c" / "cam_net.pt"))  # the run's network
    write_json_atomic(out / "config.json", cfg)
    write_json_atomic(out / "report.json", report)
    return report
