"""`fastv`: the vision tokens the last prompt token attends to most at layer K-1 (Chen et al., 2024).

With `alpha` < 1 it becomes the importance/duplication mix of the DART companion analysis (Wen et al., 2025,
arXiv 2502.11501): score = alpha * importance + (1 - alpha) * uniqueness, both min-max normalised over a row's
vision tokens, where importance is FastV's attention and uniqueness the negative cosine similarity to the
last token. Perception tasks preferred alpha near 0-0.1 there, knowledge tasks near 0.8-0.9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuner.config.options import Option
from tuner.pruning.base import Needs, ScoredMethod, SelectionContext
from tuner.pruning.registry import register_method


@register_method("fastv")
class FastV(ScoredMethod):
    """Top-`budget` vision tokens by layer K-1 attention from the last prompt token, averaged over heads.

    The attention row is captured for layer K-1 only, so the model keeps its sdpa / flash kernels. Option
    `alpha` in [0, 1] (default 1: plain FastV) mixes in uniqueness, measured on the hidden states entering
    layer K; 0 keeps the vision tokens least similar to the last token.
    """

    needs = Needs(last_row_attention=True)
    option_specs = {"alpha": Option(float, 1.0, low=0.0, high=1.0, search={"low": 0.0, "high": 1.0},
                                    help="weight of importance against uniqueness (1: plain FastV)")}

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        attention = attention_scores(ctx)
        alpha = float(self.options["alpha"])
        if alpha == 1.0:
            return attention
        mixed = torch.zeros_like(attention)
        for row in range(attention.shape[0]):  # min-max scaling is over each row's own vision tokens
            vision = ctx.vision_positions(row)
            if vision.numel():
                mixed[row, vision] = mix_scores(attention[row, vision], ctx.hidden_states[row, vision],
                                                ctx.hidden_states[row, -1], alpha)
        return mixed


def attention_scores(ctx: SelectionContext) -> torch.Tensor:
    """FastV's score of every token [B, N]: the last prompt token's attention at layer K-1, mean over heads."""
    return ctx.last_row_attention.float().mean(1)


def mix_scores(attention: torch.Tensor, states: torch.Tensor, last: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * minmax(attention) + (1 - alpha) * minmax(-cos(states, last)), over one row's vision tokens."""
    uniqueness = -F.cosine_similarity(states.float(), last.float()[None], dim=-1)
    return alpha * _min_max(attention.float()) + (1 - alpha) * _min_max(uniqueness)


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Scaled to [0, 1]; a constant vector is all zeros (it cannot rank anything)."""
    low, high = values.min(), values.max()
    return torch.zeros_like(values) if high == low else (values - low) / (high - low)
