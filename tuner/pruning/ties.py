"""Batch-independent similarity and tie-breaking for the greedy selections (DivPrune, CDPruner).

A greedy pick decided by float rounding is not a choice: the same row gives different bits alone and in a
left-padded batch (another matmul shape), and a batched similarity matrix need not even be symmetric. So each
row's similarity is computed on that row's own tokens only (its shape does not depend on the batch), made exactly
symmetric with an exact unit diagonal, and a pick takes the earliest token among those within a tolerance of the
best score: exact duplicates (LLaVA-NeXT's repeated `image_newline`) and mutual nearest neighbours then go to the
lower position, alone and in a batch alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Scores closer than this (relative to the row's score scale) are ties. float32 rounding of a cosine over a few
# thousand dimensions is ~1e-6, and a row's states differ by about that much between a batch and alone.
TIE_TOLERANCE = 1e-5
# On CPU a row's Gram matrix is computed in row panels of at least PANEL_ROWS rows (`symmetric_gram`), at most
# MAX_PANELS of them: more panels skip more of the product but run smaller, less efficient matrix products.
PANEL_ROWS, MAX_PANELS = 128, 4


def row_similarities(features: torch.Tensor, valid: torch.Tensor) -> Iterator[tuple[int, slice | torch.Tensor,
                                                                                     torch.Tensor]]:
    """Per row: (row, its valid slots as a slice or an index, the [n, n] cosine similarity of those tokens).

    Computed on the row's valid tokens alone, exactly symmetric, 1 on the diagonal. Rows whose valid slots are a
    prefix (what `padded_vision_positions` gives) are addressed by slices, which are cheaper to write through.
    """
    width = valid.shape[1]
    counts = valid.sum(1)
    prefix = bool((valid == (torch.arange(width, device=valid.device) < counts[:, None])).all())
    for row, count in enumerate(counts.tolist()):
        index = slice(0, count) if prefix else valid[row].nonzero().squeeze(1)
        unit = F.normalize(features[row, index].float(), dim=-1)
        yield row, index, symmetric_gram(unit).fill_diagonal_(1.0)


def symmetric_gram(unit: torch.Tensor) -> torch.Tensor:
    """[n, n] `unit @ unit.T` made exactly symmetric, as `(S + S.T) / 2`; on CPU for n >= 2 * `PANEL_ROWS` by
    row panels of the upper triangle, mirrored, which skips about 40% of the product and the transposed sum.

    The panels are the same bits: the BLAS computes a panel's entries as it computes them in the whole product,
    and the whole product is already exactly symmetric, so `(S + S.T) / 2 == S` (both hold for MKL's sgemm on
    panels of at least `PANEL_ROWS` rows, and `tests/test_selection_ties.py` checks them on the installed one).
    """
    count = unit.shape[0]
    if unit.device.type != "cpu" or count < 2 * PANEL_ROWS:
        similarity = unit @ unit.T
        return (similarity + similarity.T) / 2
    out = unit.new_empty(count, count)
    panels = min(MAX_PANELS, count // PANEL_ROWS)
    edges = [count * i // panels for i in range(panels + 1)]
    for start, end in zip(edges, edges[1:]):
        out[start:end, start:] = unit[start:end] @ unit[start:].T
        out[end:, start:end] = out[start:end, end:].T
    return out


def write_block(out: torch.Tensor, row: int, index: slice | torch.Tensor, block: torch.Tensor) -> None:
    """out[row] at the rows and columns `index` (from `row_similarities`) = `block`."""
    if isinstance(index, slice):
        out[row, index, index] = block
    else:
        out[row, index[:, None], index[None, :]] = block


def row_cosine(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, V, V] cosine similarity of each row's valid tokens (features [B, V, D], valid [B, V]), computed row by
    row on the valid tokens alone, exactly symmetric, 1 on the diagonal; entries of padding slots are 0."""
    batch, width = valid.shape
    if batch == 1 and bool(valid.all()):
        return next(row_similarities(features, valid))[2][None]
    out = features.new_zeros(batch, width, width, dtype=torch.float32)
    for row, index, similarity in row_similarities(features, valid):
        write_block(out, row, index, similarity)
    return out


def tie_tolerance(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """[B, 1] or [1, 1]: how far below a row's best score a score still ties (`TIE_TOLERANCE * scale`)."""
    return TIE_TOLERANCE * torch.as_tensor(scale, dtype=like.dtype, device=like.device).reshape(-1, 1)


def earliest_near(scores: torch.Tensor, tolerance: torch.Tensor) -> torch.Tensor:
    """Per row of `scores` [B, V], the lowest index whose score is within `tolerance` (`tie_tolerance`) of the
    row's best; -inf entries are never picked unless all are."""
    near = scores >= scores.amax(1, keepdim=True) - tolerance
    return near.to(torch.int8).argmax(1)  # argmax returns the first maximum: the earliest near-best token


def earliest_best(scores: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per row of `scores` [B, V], the lowest index whose score is within `TIE_TOLERANCE * scale` of the row's
    best (`scale` [B] or a number: the size of the row's scores); -inf entries are never picked unless all are."""
    return earliest_near(scores, tie_tolerance(scale, scores))
