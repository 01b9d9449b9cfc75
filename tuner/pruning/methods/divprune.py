"""`divprune`: the most diverse vision tokens by greedy max-min selection on cosine distance.

DivPrune (Alvar, Singh, Akbari, Zhang; CVPR 2025; arXiv 2503.02175; official code github.com/vbdi/divprune)
casts pruning as a max-min diversity problem on the distance d(i, j) = 1 - cos(x_i, x_j) between vision tokens
and solves it greedily, as the official code does:
- the first pick is the token whose nearest other token is farthest: argmax_j min_{i != j} d(i, j);
- every next pick is the token farthest from the picks so far: argmax_j min_{s picked} d(s, j);
- ties go to the earlier position, where a tie is any score within rounding of the best
  (`tuner.pruning.ties`): distances are computed row by row and made exactly symmetric, so a row keeps the same
  tokens alone and in a left-padded batch even among exact duplicates and mutual nearest neighbours.
The official code runs on LLaVA's projected vision features before the language model; here it runs on the
hidden states entering the stage's layer K, which at K = 0 are those projected features. Two details differ,
neither on inputs without exact duplicates: a picked token is never picked again (the official loop can pick
one twice when every remaining distance is 0), and the first pick excludes a token's distance to itself
explicitly rather than by taking its second-smallest distance.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.layer_inputs import gather_rows
from tuner.pruning.registry import register_method
from tuner.pruning.ties import earliest_near, row_similarities, tie_tolerance, write_block


@register_method("divprune")
class DivPrune(PruningMethod):
    """Keeps `budget` vision tokens per row chosen by DivPrune's greedy max-min cosine distance."""

    default_layer = 0  # the paper prunes the projected vision features, before the language model

    def select(self, ctx: SelectionContext) -> Selection:
        positions, valid = ctx.padded_vision_positions()
        states = gather_rows(ctx.hidden_states, positions)
        counts = valid.sum(1).tolist()
        order = max_min_order(states, valid, [b if b < n else 0 for b, n in zip(ctx.budgets, counts)])
        return Selection([positions[row, :n] if budget >= n else positions[row, order[row, :budget]].sort().values
                          for row, (budget, n) in enumerate(zip(ctx.budgets, counts))])


def max_min_order(features: torch.Tensor, valid: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """DivPrune's picks, in pick order, per row: [B, T] indices into `features` [B, V, D] (T = the largest budget).

    `valid` [B, V] marks the real tokens of each row; row r's first `budgets[r]` picks are its selection (later
    columns are filler). Rows are independent. Each step is a tie-aware argmax, one distance row and an elementwise
    minimum: in numpy on CPU, in tensor operations elsewhere (the same float32 results).
    """
    batch, width = valid.shape
    steps = max(budgets, default=0)
    if steps > width:
        raise ValueError(f"budgets {budgets} exceed the {width} tokens of the widest row")
    if steps == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=valid.device)
    distance, score = cosine_distances(features, valid)
    score.masked_fill_(~valid, -math.inf)  # padding is never picked
    tolerance = tie_tolerance(1.0, score)
    if distance.device.type == "cpu":
        return torch.from_numpy(_max_min_steps_numpy(distance.numpy(), score.numpy(), valid.numpy(),
                                                     float(tolerance[0, 0]), steps))
    return _max_min_steps_torch(distance, score, valid, tolerance, steps)


def _max_min_steps_torch(distance: torch.Tensor, score: torch.Tensor, valid: torch.Tensor, tolerance: torch.Tensor,
                         steps: int) -> torch.Tensor:
    """The greedy loop in tensor operations, every row in each step (a GPU runs ~7 kernels per pick)."""
    batch, width = valid.shape
    flat_distance = distance.view(batch * width, width)
    offsets = torch.arange(batch, device=valid.device) * width
    picks = []
    for step in range(steps):
        pick = earliest_near(score, tolerance)
        picks.append(pick)
        at = offsets + pick if batch > 1 else pick
        nearest_pick = flat_distance.index_select(0, at)  # [B, V]: every token's distance to the new pick
        if step == 0:
            score = nearest_pick.masked_fill_(~valid, -math.inf)
        else:
            torch.minimum(score, nearest_pick, out=score)
        score.view(-1).index_fill_(0, at, -math.inf)  # a picked token is never picked again
    return torch.stack(picks, 1)


def _max_min_steps_numpy(distance: np.ndarray, score: np.ndarray, valid: np.ndarray, tolerance: float,
                         steps: int) -> np.ndarray:
    """The same loop on CPU in numpy, row by row: the same float32 minimum, maximum and comparisons (so the same
    picks, bit for bit), at about a third of torch's per-operation overhead on 576-wide rows."""
    picks = np.zeros((valid.shape[0], steps), dtype=np.int64)
    tolerance = np.float32(tolerance)
    for row in range(valid.shape[0]):
        rows, current, invalid = distance[row], score[row].copy(), ~valid[row]
        for step in range(steps):
            pick = int(np.argmax(current >= current.max() - tolerance))  # the earliest near-best token
            picks[row, step] = pick
            if step == 0:
                current = rows[pick].copy()
                current[invalid] = -np.inf
            else:
                np.minimum(current, rows[pick], out=current)
            current[pick] = -np.inf  # a picked token is never picked again
    return picks


def cosine_distances(features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, V, V] d = 1 - cos per row (`row_similarities`), [B, V] each token's distance to its nearest other).

    The diagonal of `d` holds inf (a token is no other's nearest); entries of padding slots are 0.
    """
    batch, width = valid.shape
    whole = batch == 1 and bool(valid.all())  # one row without padding: its own block is the whole matrix
    distance = None if whole else features.new_zeros(batch, width, width, dtype=torch.float32)
    nearest = features.new_empty(batch, width, dtype=torch.float32)
    for row, index, similarity in row_similarities(features, valid):
        block = similarity.neg_().add_(1.0).fill_diagonal_(math.inf)  # -s + 1 is 1 - s, bit for bit
        if whole:
            distance = block[None]
        else:
            write_block(distance, row, index, block)
        nearest[row, index] = block.amin(0)
    return distance, nearest
