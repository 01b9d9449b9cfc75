"""`random`: a uniform random subset of each row's vision tokens."""

from __future__ import annotations

import hashlib

import torch

from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method


@register_method("random")
class RandomPruning(PruningMethod):
    """Uniform random subset, seeded per row from the config seed and the row's own tokens.

    Seeding by content makes a request's subset reproducible and independent of the batch it is in.
    """

    def select(self, ctx: SelectionContext) -> Selection:
        kept = []
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            generator = torch.Generator().manual_seed(self._row_seed(ctx, row))
            order = torch.randperm(vision.numel(), generator=generator)[:budget]
            kept.append(vision[order.to(vision.device)].sort().values)
        return Selection(kept)

    def _row_seed(self, ctx: SelectionContext, row: int) -> int:
        tokens = ctx.input_ids[row][ctx.attention_mask[row]].cpu().numpy().tobytes()
        digest = hashlib.blake2b(tokens, digest_size=8, key=str(self.config.seed).encode()).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)
