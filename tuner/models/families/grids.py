"""Images as 2-D grids of sequence positions, for methods that select by spatial neighbourhood (`window_fastv`).

A family lays out each image's vision tokens as one or more grids (a crop, a tile, a sub-image, a video frame);
vision tokens on no grid (LLaVA-NeXT's and OneVision's row newlines, images whose layout is unknown) go to a
row's `leftover`, in ascending position order. Every vision token of a row appears exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageGrids:
    """One batch row's vision tokens: 2-D grids of positions (row-major as in the image) and those on no grid."""

    grids: list[torch.Tensor]  # each [h, w] long, sequence positions
    leftover: torch.Tensor  # [n] long, ascending sequence positions of vision tokens on no grid


@dataclass(frozen=True)
class Layout:
    """How one image's run of vision tokens (in feature order) splits into grids and tokens on no grid."""

    n_tokens: int
    grids: list[torch.Tensor]  # [h, w] local indices into the image's tokens
    leftover: torch.Tensor  # local indices of tokens on no grid

    @classmethod
    def grid(cls, height: int, width: int, frames: int = 1) -> Layout:
        """`frames` grids of height x width tokens, one after the other, in row-major order."""
        local = torch.arange(frames * height * width).view(frames, height, width)
        return cls(frames * height * width, list(local.unbind(0)), torch.zeros(0, dtype=torch.long))

    @classmethod
    def with_newlines(cls, side: int, height: int, width: int) -> Layout:
        """LLaVA-NeXT / OneVision: a side x side base crop, then `height` rows of `width` tokens, each + a newline."""
        rows = side * side + torch.arange(height * (width + 1)).view(height, width + 1)
        base = torch.arange(side * side).view(side, side)
        return cls(side * side + height * (width + 1), [base, rows[:, :width]] if height * width else [base],
                   rows[:, width])


def grids_from_runs(vision: torch.Tensor, grid_tokens: int | None = None) -> list[ImageGrids]:
    """Each contiguous run of vision tokens is cut into chunks of `grid_tokens` (None: the whole run); a chunk
    of a square number of tokens is a square grid, any other chunk goes to the leftover (1-D)."""
    out = []
    for row in range(vision.shape[0]):
        positions = vision[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            out.append(ImageGrids([], positions))
            continue
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[1:] = positions[1:] != positions[:-1] + 1
        grids, leftover = [], []
        for run in torch.tensor_split(positions, starts.nonzero().squeeze(1)[1:].cpu()):
            for chunk in torch.split(run, grid_tokens or run.numel()):
                side = math.isqrt(chunk.numel())
                if side * side == chunk.numel():
                    grids.append(chunk.view(side, side))
                else:
                    leftover.append(chunk)
        out.append(ImageGrids(grids, torch.cat(leftover) if leftover else positions[:0]))
    return out


def place_layouts(tokens: torch.Tensor, layouts: list[Layout]) -> list[ImageGrids] | None:
    """Lay the images' `layouts` over the True positions of `tokens` [B, N] in row-major order, as the model
    scatters image features. None unless they account for every token exactly, no image spanning two rows."""
    rows, cols = tokens.nonzero(as_tuple=True)
    if sum(layout.n_tokens for layout in layouts) != cols.numel():
        return None
    grids: list[list[torch.Tensor]] = [[] for _ in range(tokens.shape[0])]
    leftover: list[list[torch.Tensor]] = [[] for _ in range(tokens.shape[0])]
    offset = 0
    for layout in layouts:
        end = offset + layout.n_tokens
        if layout.n_tokens == 0:
            continue
        if rows[offset] != rows[end - 1]:
            return None
        row, span = int(rows[offset]), cols[offset:end]
        grids[row].extend(span[g.to(span.device)] for g in layout.grids)
        leftover[row].append(span[layout.leftover.to(span.device)])
        offset = end
    return [ImageGrids(g, torch.cat(left).sort().values if left else cols[:0]) for g, left in zip(grids, leftover)]


def merge_grids(parts: list[list[ImageGrids]]) -> list[ImageGrids]:
    """Row-wise union of grids laid over disjoint token kinds (e.g. Qwen's image and video tokens)."""
    return [ImageGrids([g for part in row for g in part.grids],
                       torch.cat([part.leftover for part in row]).sort().values) for row in zip(*parts)]
