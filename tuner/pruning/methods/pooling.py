"""`pooling`: evenly spaced vision tokens (a uniform subsample over the row's vision sequence)."""

from __future__ import annotations

import torch

from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method


@register_method("pooling")
class Pooling(PruningMethod):
    """Keeps the token at the centre of each of `budget` equal slices of the vision sequence."""

    def select(self, ctx: SelectionContext) -> Selection:
        kept = []
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            centres = ((2 * torch.arange(budget, device=vision.device) + 1) * vision.numel()) // (2 * budget)
            kept.append(vision[centres])
        return Selection(kept)
