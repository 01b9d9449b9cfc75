"""`avgpool`: spatial mean-pooling of vision tokens (e.g. 2x2: 576 -> 144), replacing the kept states."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tuner.config.options import Option
from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method

if TYPE_CHECKING:
    from tuner.config import PruningConfig


@register_method("avgpool")
class AvgPool(PruningMethod):
    """Averages the hidden states of each s x s window of an image's token grid into one token.

    Each contiguous run of vision tokens is one image; a run of h*h tokens is pooled as an h x h grid, any
    other run as consecutive groups of s*s tokens. The pooled state sits at the window's first token
    (its position, hence RoPE, is kept). `stride` s defaults to round(sqrt(n_vision / budget)).
    """

    option_specs = {"stride": Option(int, None, low=1, nullable=True,
                                     help="pooling window side (null: from the amount)")}

    @classmethod
    def requires_amount(cls, config: PruningConfig) -> bool:
        return config.options.get("stride") is None

    def select(self, ctx: SelectionContext) -> Selection:
        kept, states = [], []
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            stride = self.options["stride"] or max(1, round(math.sqrt(vision.numel() / budget)))
            window = _window_ids(vision, stride)
            n_windows = int(window.max()) + 1
            hidden = ctx.hidden_states[row, vision].float()
            sums = hidden.new_zeros(n_windows, hidden.shape[-1]).index_add_(0, window, hidden)
            counts = torch.bincount(window, minlength=n_windows).unsqueeze(1)
            first = torch.full((n_windows,), vision.numel(), device=vision.device).scatter_reduce_(
                0, window, torch.arange(vision.numel(), device=vision.device), reduce="amin")
            kept.append(vision[first])  # window ids follow row-major order, so these are ascending
            states.append((sums / counts).to(ctx.hidden_states.dtype))
        return Selection(kept, states)


def _window_ids(vision: torch.Tensor, stride: int) -> torch.Tensor:
    """Pooling-window index of every vision token, counted across the row's images in order."""
    run_starts = torch.ones_like(vision, dtype=torch.bool)
    run_starts[1:] = vision[1:] != vision[:-1] + 1
    ids, offset = [], 0
    for run in torch.tensor_split(torch.arange(vision.numel(), device=vision.device),
                                  run_starts.nonzero().squeeze(1)[1:].cpu()):
        n = run.numel()
        side = math.isqrt(n)
        local = run - run[0]
        if side * side == n:
            cols = math.ceil(side / stride)
            run_ids = (local // side // stride) * cols + (local % side) // stride
        else:
            run_ids = local // (stride * stride)
        ids.append(run_ids + offset)
        offset += int(run_ids.max()) + 1
    return torch.cat(ids)
