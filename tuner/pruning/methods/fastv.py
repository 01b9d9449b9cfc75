"""`fastv`: the vision tokens the last prompt token attends to most at layer K-1 (Chen et al., 2024)."""

from __future__ import annotations

from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method


@register_method("fastv")
class FastV(PruningMethod):
    """Top-`budget` vision tokens by layer K-1 attention from the last prompt token, averaged over heads.

    The attention row is captured for layer K-1 only, so the model keeps its sdpa / flash kernels.
    """

    needs_last_row_attention = True

    def select(self, ctx: SelectionContext) -> Selection:
        scores = ctx.last_row_attention.float().mean(1)  # [B, N]
        kept = []
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            top = scores[row, vision].topk(budget).indices
            kept.append(vision[top].sort().values)
        return Selection(kept)
