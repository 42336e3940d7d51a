"""Text side of the CLIP-guided methods: class prompts, POLE's adaptors, SemPLeS's learned prompts.

SemPLeS learns, for every class k, L token embeddings placed inside CLIP's text sequence
``[SOT] a photo of [p_1 .. p_L] . [EOT]``; the feature is read at the EOT position (5 + L) and
projected by CLIP's text projection. :func:`encode_text_embeddings` runs open_clip's text tower
on given input embeddings so that the tower itself stays open_clip's, unchanged and frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

PROMPT_PREFIX = "a photo of"
CLASS_TEMPLATE = "a photo of {}."


def encode_text_embeddings(model, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` from input embeddings ``B x T x W`` (``tokens`` locate EOT).

    Equal to ``model.encode_text(tokens)`` when ``embeddings == model.token_embedding(tokens)``.
    """
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


class BackgroundPrompts(nn.Module):
    """SemPLeS's class-associated background prompts: a ``C x L x W`` parameter (uniform [0, 1) init)."""

    def __init__(self, model, tokenizer, num_classes: int, length: int = 30):
        super().__init__()
        width = model.token_embedding.weight.shape[1]
        context = model.positional_embedding.shape[0]
        if 5 + length >= context:
            raise ConfigError(f"prompt_length: got {length} | expected at most {context - 6} "
                              f"(CLIP's context holds {context} tokens)")
        self.embeddings = nn.Parameter(torch.rand(num_classes, length, width))
        # "a photo of" + L placeholders + "." ; the placeholders' ids never reach the tower
        template = " ".join([PROMPT_PREFIX] + ["x"] * length) + "."
        tokens = tokenizer([template])
        self.register_buffer("tokens", tokens.expand(num_classes, -1).clone(), persistent=False)
        self.length = length

    def forward(self, model) -> torch.Tensor:
        """L2-normalised prompt features ``C x D`` (gradients reach only the prompt embeddings)."""
        with torch.no_grad():
            base = model.token_embedding(self.tokens)
        start = 1 + len(PROMPT_PREFIX.split())  # after [SOT] a photo of
        embeddings = torch.cat([base[:, :start], self.embeddings.to(base.dtype), base[:, start + self.length:]], 1)
        return F.normalize(encode_text_embeddings(model, self.tokens, embeddings), dim=-1)


class ClipAdapter(nn.Module):
    """POLE's CLIP-Adapter: f' = normalise(r * A(f) + (1 - r) * f), A = two bias-free linears with ReLUs.

    The ratio r is a learnable D-vector initialised to 0.2; the hidden width is D / 4 (512 -> 128).
    """

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))
        self.ratio = nn.Parameter(torch.full((dim,), ratio))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * self.mlp(features) + (1 - self.ratio) * features, dim=-1)
