"""The CLIP-guided losses of CLIMS, POLE and SemPLeS as small pure functions.

Notation (../shared/METHODS.md): for a present class k of an image X with class map P_k,
fg_k = P_k * X and bg_k = (1 - P_k) * X; t_k is the class text embedding, b_j a fixed background
prompt, p_k a learned background prompt. s(a, b) is the cosine similarity of L2-normalised CLIP
embeddings clamped to [1e-4, 0.9999] so that every log below is finite.

All embeddings are ``N x D`` rows that are already L2-normalised; row n of the image side pairs
with row n of the text side (one row per (image, present class)).
"""

from __future__ import annotations

import torch

SIM_MIN, SIM_MAX = 1e-4, 0.9999


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise s(a_n, b_n) = clamp(<a_n, b_n>, 1e-4, 0.9999) for normalised ``N x D`` inputs."""
    return (a * b).sum(-1).clamp(SIM_MIN, SIM_MAX)


def object_text_matching(fg: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """L_OTM = -mean_n log s(fg_n, t_n): the masked object must look like its class text."""
    return -torch.log(similarity(fg, text)).mean()


def background_text_matching(bg: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """L_BTM = -mean_n log(1 - s(bg_n, t_n)): what the CAM leaves out must not look like the class."""
    return -torch.log(1.0 - similarity(bg, text)).mean()


def class_background_suppression(fg: torch.Tensor, backgrounds: torch.Tensor, threshold: float) -> torch.Tensor:
    """L_CBS = -SUM over pairs (n, j) with s(fg_n, b_j) > threshold of log(1 - s(fg_n, b_j)).

    ``backgrounds`` is ``M x D`` (CLIMS's fixed prompts "a photo of {tree, river, ...}.").
    A sum over the firing pairs, not a mean, as in the reference code.
    """
    sims = (fg @ backgrounds.T).clamp(SIM_MIN, SIM_MAX)
    firing = sims > threshold
    return -(torch.log(1.0 - sims) * firing).sum()


def area_regularisation(class_maps: torch.Tensor) -> torch.Tensor:
    """L_REG = mean of P over classes and pixels: keeps the maps from growing over everything."""
    return class_maps.mean()


def prompt_contrast(bg: torch.Tensor, prompts: torch.Tensor, text: torch.Tensor, text_weight: float) -> torch.Tensor:
    """SemPLeS stage (b): -mean log s(bg_n, p_n) + w * mean log s(t_n, p_n).

    The learned prompt p_k is pulled to the background of class k and pushed from the class text.
    """
    pull = -torch.log(similarity(bg, prompts)).mean()
    push = torch.log(similarity(text, prompts)).mean()
    return pull + text_weight * push


def prompt_guided_suppression(fg: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """SemPLeS stage (c) term: -mean log(1 - s(fg_n, p_n)); the object must not look like its background."""
    return -torch.log(1.0 - similarity(fg, prompts)).mean()
