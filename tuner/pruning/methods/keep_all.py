"""`keep_all`: hooks active, nothing removed. The control for overhead and exact equivalence."""

from __future__ import annotations

from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method


@register_method("keep_all")
class KeepAll(PruningMethod):
    """Keeps every vision token; the model must behave exactly as without hooks."""

    needs_amount = False

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection([ctx.vision_positions(row) for row in range(len(ctx.budgets))])
