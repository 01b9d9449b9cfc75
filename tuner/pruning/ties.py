"""Batch-independent similarity and tie-breaking for the greedy selections (DivPrune, CDPruner).

A greedy pick decided by float rounding is not a choice: the same row gives different bits alone and in a
left-padded batch (another matmul shape), and a batched similarity matrix need not even be symmetric. So each
row's similarity is computed on that row's own tokens only (its shape does not depend on the batch), made exactly
symmetric with an exact unit diagonal, and a pick takes the earliest token among those within a tolerance of the
best score: exact duplicates (LLaVA-NeXT's repeated `image_newline`) and mutual nearest neighbours then go to the
lower position, alone and in a batch alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Scores closer than this (relative to the row's score scale) are ties. float32 rounding of a cosine over a few
# thousand dimensions is ~1e-6, and a row's states differ by about that much between a batch and alone.
TIE_TOLERANCE = 1e-5


def row_cosine(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, V, V] cosine similarity of each row's valid tokens (features [B, V, D], valid [B, V]), computed row by
    row on the valid tokens alone, exactly symmetric, 1 on the diagonal; entries of padding slots are 0."""
    batch, width = valid.shape
    out = features.new_zeros(batch, width, width, dtype=torch.float32)
    for row in range(batch):
        index = valid[row].nonzero().squeeze(1)
        unit = F.normalize(features[row, index].float(), dim=-1)
        similarity = unit @ unit.T
        similarity = (similarity + similarity.T) / 2
        similarity.fill_diagonal_(1.0)
        out[row, index[:, None], index[None, :]] = similarity
    return out


def earliest_best(scores: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per row of `scores` [B, V], the lowest index whose score is within `TIE_TOLERANCE * scale` of the row's
    best (`scale` [B] or a number: the size of the row's scores); -inf entries are never picked unless all are."""
    best = scores.amax(1, keepdim=True)
    tolerance = TIE_TOLERANCE * torch.as_tensor(scale, dtype=scores.dtype, device=scores.device).reshape(-1, 1)
    near = scores >= best - tolerance
    return near.to(torch.int8).argmax(1)  # argmax returns the first maximum: the earliest near-best token
