"""`random`: a uniform random subset of each row's vision tokens."""

from __future__ import annotations

import hashlib

import torch

from tuner.pruning.base import ScoredMethod, SelectionContext
from tuner.pruning.registry import register_method


@register_method("random")
class RandomPruning(ScoredMethod):
    """Uniform random subset, seeded per row from the config seed and the row's own tokens.

    Seeding by content makes a request's subset reproducible and independent of the batch it is in.
    """

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """Each row's vision tokens ranked by a seeded permutation: the first `budget` of it are kept."""
        scores = torch.zeros(ctx.vision_mask.shape, dtype=torch.float32)
        for row in range(ctx.vision_mask.shape[0]):
            vision = ctx.vision_positions(row).cpu()
            generator = torch.Generator().manual_seed(self._row_seed(ctx, row))
            order = torch.randperm(vision.numel(), generator=generator)
            scores[row, vision[order]] = torch.arange(vision.numel(), 0, -1, dtype=torch.float32)
        return scores.to(ctx.vision_mask.device)

    def _row_seed(self, ctx: SelectionContext, row: int) -> int:
        tokens = ctx.input_ids[row][ctx.attention_mask[row]].cpu().numpy().tobytes()
        digest = hashlib.blake2b(tokens, digest_size=8, key=str(self.config.seed).encode()).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)
