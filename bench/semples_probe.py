"""Why SemPLeS's refinement does (or does not) pull CAMs off the context: a probe of a SemPLeS run.

For a run's stage (c) setting (the generator S it starts from, its CLIP and its learned prompts) it
measures, over images where class k has both object and context pixels:

1. what the learned prompt p_k matches: s(view, p_k) for the image masked to the ground-truth
   object, object + context, and context alone (hard masks), and cos(p_k, "a photo of the {context}.");
2. how s(view, p_k) grows with the context's mask value a (view masked by object + a * context, a in
   0..1) next to the mask value S itself puts on the context: where the curve is flat at S's value,
   the suppression term has no slope to pull the mask down with;
3. which way each stage-(c) term pushes S's masks: the descent direction -dL/dM_k averaged over the
   object pixels and over the context pixels, at S's own min-max masks. A refinement term that
   suppresses the context has a negative mean on context pixels (it wants M_k lower there).

Writes ``bench/results/semples_probe_<name>.{json,md}``.

    python bench/semples_probe.py --run runs/demo --name seed0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.configs import load_config
from promptseg.data.synth import WORLD_CLASSES
from promptseg.train import losses
from promptseg.train.cams import imagenet_normalise
from promptseg.train.config import CamTrainConfig
from promptseg.train.methods import SemplesRefineTrainer, semples_masks

RESULTS = Path(__file__).with_name("results")
VIEWS = ("object", "object+context", "context")
CONTEXT_LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
TERMS = ("otm", "btm", "refine")


def _hard_views(trainer, image01: torch.Tensor, keeps: list[np.ndarray]) -> torch.Tensor:
    maps = torch.from_numpy(np.stack(keeps).astype(np.float32))[None]
    fg, _, _, _ = trainer.views_from_maps(image01, maps, torch.ones(1, len(keeps)))
    return trainer.encode_images(fg)


def probe(run: Path, images: int, min_pixels: int = 20) -> dict:
    cfg = load_config(CamTrainConfig, run / "semples" / "stage_c" / "config.json")
    trainer = SemplesRefineTrainer(cfg)  # S as stage (c) starts from it, the CLIP, the folded prompts
    trainer.net.eval()
    names = trainer.dataset.class_names
    contexts = {c.name: c.context for c in WORLD_CLASSES}
    context_text = trainer.prompt_features(trainer.guide.background_template, [contexts[n] for n in names])
    sims = {n: {v: [] for v in VIEWS} for n in names}
    by_level = {n: [] for n in names}
    s_on_context = {n: [] for n in names}
    push = {n: {t: {"object": [], "context": []} for t in TERMS} for n in names}
    for index in range(min(images, len(trainer.dataset))):
        sample = trainer.dataset[index]
        image01 = torch.from_numpy(sample.load_image()).permute(2, 0, 1).float()[None] / 255.0
        mask, context = sample.load_mask(), sample.load_context()
        labels = torch.from_numpy(sample.labels)[None]
        present = [k for k in np.nonzero(sample.labels)[0]
                   if (mask == k + 1).sum() >= min_pixels and (context == k + 1).sum() >= min_pixels]
        if not present:
            continue
        with torch.no_grad():
            for k in present:
                obj, ctx = mask == k + 1, context == k + 1
                feats = _hard_views(trainer, image01, [obj, obj | ctx, ctx])
                for view, value in zip(VIEWS, (feats @ trainer.prompt_text[k]).tolist(), strict=True):
                    sims[names[k]][view].append(value)
                levels = _hard_views(trainer, image01, [obj + a * ctx for a in CONTEXT_LEVELS])
                by_level[names[k]].append((levels @ trainer.prompt_text[k]).tolist())
            cams = trainer.net(imagenet_normalise(image01))
        maps = F.interpolate(semples_masks(cams, trainer.clip_size, trainer.mask_eps), size=image01.shape[-2:],
                             mode="bilinear", align_corners=True).requires_grad_(True)  # S's masks, at image size
        fg_f, bg_f, k_idx = _embed(trainer, image01, maps, labels)
        terms = {"otm": losses.object_text_matching(fg_f, trainer.class_text[k_idx]),
                 "btm": losses.background_text_matching(bg_f, trainer.class_text[k_idx]),
                 "refine": losses.prompt_guided_suppression(fg_f, trainer.prompt_text[k_idx])}
        for name, term in terms.items():
            (grad,) = torch.autograd.grad(term, maps, retain_graph=True)
            for k in present:
                if name == "refine":
                    s_on_context[names[k]].append(float(maps[0, k].detach().numpy()[context == k + 1].mean()))
                descent = -grad[0, k].numpy()
                push[names[k]][name]["object"].append(float(descent[mask == k + 1].mean()))
                push[names[k]][name]["context"].append(float(descent[context == k + 1].mean()))
    return {
        "run": str(run), "generator": cfg.guidance.init_from, "prompts": cfg.guidance.prompts_from,
        "prompt_context_text_cos": {n: float(trainer.prompt_text[k] @ context_text[k]) for k, n in enumerate(names)},
        "prompt_similarity": {n: {v: float(np.mean(x)) for v, x in d.items()} for n, d in sims.items()},
        "context_levels": list(CONTEXT_LEVELS),
        "prompt_similarity_by_context_level": {n: np.mean(x, axis=0).tolist() for n, x in by_level.items()},
        "generator_mask_on_context": {n: float(np.mean(x)) for n, x in s_on_context.items()},
        "descent_x1e4": {n: {t: {where: float(1e4 * np.mean(x)) for where, x in d.items()} for t, d in ts.items()}
                         for n, ts in push.items()},
        "pairs": {n: len(d["object"]) for n, d in sims.items()},
    }


def _embed(trainer, image01, maps, labels):
    """fg/bg CLIP features of every present class at the given masks (``embed_views`` would re-normalise
    CAMs into masks; here the gradient is taken with respect to the masks themselves)."""
    fg, bg, _, k_idx = trainer.views_from_maps(image01, maps, labels)
    feats = trainer.encode_images(torch.cat([fg, bg]))
    return feats[: len(fg)], feats[len(fg):], k_idx


def to_markdown(result: dict) -> str:
    lines = [f"# SemPLeS probe: {result['run']}", "",
             f"S = {result['generator']}; prompts = {result['prompts']}.", "",
             "## What the learned prompt matches (cosine with the image masked to ground truth)", "",
             "| class | object | object+context | context | cos(p_k, context text) | pairs |",
             "|---|---|---|---|---|---|"]
    for name, d in result["prompt_similarity"].items():
        lines.append(f"| {name} | {d['object']:.3f} | {d['object+context']:.3f} | {d['context']:.3f} | "
                     f"{result['prompt_context_text_cos'][name]:.2f} | {result['pairs'][name]} |")
    levels = result["context_levels"]
    lines += ["", "## s(view, p_k) as the context's mask value a grows (view = object + a * context)", "",
              "S's own mask on the context (min-max, as stage (c) sees it) in the last column.", "",
              "| class | " + " | ".join(f"a={a:g}" for a in levels) + " | S's mask on context |",
              "|---|" + "---|" * (len(levels) + 1)]
    for name, values in result["prompt_similarity_by_context_level"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {result['generator_mask_on_context'][name]:.2f} |")
    lines += ["", "## Which way each stage-(c) term moves S's masks (-dL/dM x 1e4, mean over pixels)", "",
              "Negative on context = the term pulls the mask off the context.", "",
              "| class | otm obj | otm ctx | btm obj | btm ctx | refine obj | refine ctx |",
              "|---|---|---|---|---|---|---|"]
    for name, d in result["descent_x1e4"].items():
        cells = " | ".join(f"{d[t][w]:+.2f}" for t in TERMS for w in ("object", "context"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a pipeline run folder holding semples/")
    parser.add_argument("--name", default="seed0", help="suffix of the results files")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = probe(Path(args.run), args.images)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"semples_probe_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"semples_probe_{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
