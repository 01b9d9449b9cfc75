"""The slow reference for the greedy selections of DivPrune and CDPruner: step by step, in tensor operations, as
they were before they were vectorised; `test_greedy_oracle.py` holds the package to its kept sets (not in it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.cdpruner import instruction_mask, instruction_relevance, min_max, relevance_weights

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


def max_min_order(features: torch.Tensor, valid: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """DivPrune's picks, in pick order, per row: [B, T] indices into `features` [B, V, D] (T = the largest budget).

    `valid` [B, V] marks the real tokens of each row; row r's first `budgets[r]` picks are its selection (later
    columns are filler). Rows are independent.
    """
    batch, width = valid.shape
    steps = max(budgets, default=0)
    if steps > width:
        raise ValueError(f"budgets {budgets} exceed the {width} tokens of the widest row")
    distance = 1.0 - row_cosine(features, valid)  # [B, V, V], per row, exactly symmetric, 0 on the diagonal
    rows = torch.arange(batch, device=valid.device)
    others = valid[:, :, None] & valid[:, None, :] & ~torch.eye(width, dtype=torch.bool, device=valid.device)
    score = distance.masked_fill(~others, math.inf).amin(1)  # distance to the nearest other token
    taken = ~valid
    picks = []
    for _ in range(steps):
        pick = earliest_best(score.masked_fill(taken, -math.inf))
        picks.append(pick)
        taken = taken.clone()
        taken[rows, pick] = True
        nearest_pick = distance[rows, pick]  # [B, V]: every token's distance to the new pick
        score = nearest_pick if len(picks) == 1 else torch.minimum(score, nearest_pick)
    if not picks:
        return torch.zeros(batch, 0, dtype=torch.long, device=valid.device)
    return torch.stack(picks, 1)


def conditional_kernel(unit: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, V, V] L_ij = w_i cos(x_i, x_j) w_j from unit vectors [B, V, D]; rows and columns of padding are 0.

    The cosines are computed row by row, exactly symmetric with cos(x_i, x_i) = 1 (`tuner.pruning.ties.row_cosine`),
    so equal weights tie exactly and a row's kernel does not depend on the batch it is in.
    """
    weights = weights * valid
    similarity = row_cosine(unit, valid)
    return weights[:, :, None] * similarity * weights[:, None, :]


def greedy_map_order(kernel: torch.Tensor, valid: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Greedy MAP picks of the DPP with kernel [B, V, V], in pick order: [B, T] (T = the largest budget).

    Each step adds the token j of largest gain d_j^2 = L_jj - |c_j|^2, the factor by which det L_S grows, then
    updates every gain with the new pick's orthogonalised row e = (L_j - c_j . C) / d_j (Chen et al., 2018).
    Ties, gains within rounding of the best (relative to the row's largest L_jj), go to the earlier token, so
    exact duplicates are decided by position, not by rounding. Row r's first `budgets[r]` picks are its
    selection; rows are independent.
    """
    batch, width = valid.shape
    steps = max(budgets, default=0)
    if steps > width:
        raise ValueError(f"budgets {budgets} exceed the {width} tokens of the widest row")
    rows = torch.arange(batch, device=valid.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~valid, -math.inf)
    scale = gains.amax(1).clamp_min(torch.finfo(kernel.dtype).tiny)  # the row's largest gain: its score scale
    directions = kernel.new_zeros(steps, batch, width)  # c: each pick's orthogonalised kernel row
    picks = []
    for step in range(steps):
        pick = earliest_best(gains, scale)
        picks.append(pick)
        gain = gains[rows, pick]
        spanned = torch.einsum("tb,tbv->bv", directions[:step, rows, pick], directions[:step])
        update = (kernel[rows, pick] - spanned) / gain.clamp_min(torch.finfo(gain.dtype).tiny).sqrt()[:, None]
        update = torch.where((gain > 0)[:, None], update, 0.0)
        directions[step] = update
        gains = gains - update.square()
        gains[rows, pick] = -math.inf
    if not picks:
        return torch.zeros(batch, 0, dtype=torch.long, device=valid.device)
    return torch.stack(picks, 1)


def divprune_kept(ctx: SelectionContext) -> list[list[int]]:
    """DivPrune's kept positions per row, as `DivPrune.select` chose them."""
    positions, valid = ctx.padded_vision_positions()
    states = ctx.hidden_states.gather(1, positions[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
    counts = valid.sum(1).tolist()
    order = max_min_order(states, valid, [b if b < n else 0 for b, n in zip(ctx.budgets, counts)])
    return [(positions[row, :n] if budget >= n else positions[row, order[row, :budget]].sort().values).tolist()
            for row, (budget, n) in enumerate(zip(ctx.budgets, counts))]


def cdpruner_kept(ctx: SelectionContext, theta: float | None = None, negate: bool = False) -> list[list[int]]:
    """CDPruner's kept positions per row, as `CDPruner.select` chose them."""
    positions, valid = ctx.padded_vision_positions()
    states = ctx.hidden_states.gather(1, positions[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
    unit = F.normalize(states.float(), dim=-1)
    instruction = instruction_mask(ctx.vision_mask.bool(), ctx.attention_mask.bool())
    relevance = instruction_relevance(unit, ctx.hidden_states, instruction)
    if negate:
        relevance = -relevance
    weights = relevance_weights(min_max(relevance, valid), theta)
    counts = valid.sum(1).tolist()
    order = greedy_map_order(conditional_kernel(unit, weights, valid), valid,
                             [b if b < n else 0 for b, n in zip(ctx.budgets, counts)])
    return [(positions[row, :n] if budget >= n else positions[row, order[row, :budget]].sort().values).tolist()
            for row, (budget, n) in enumerate(zip(ctx.budgets, counts))]


def main() -> None:
    """Interleaved selection timings of this oracle and the package on bench-pruning's small shape (576 vision
    tokens, hidden 1024): `PYTHONPATH=. python tests/greedy_oracle.py [threads]` (default 2) prints median ms per
    budget."""
    import functools
    import statistics
    import sys
    import time

    import tuner
    from tuner.bench.shapes import build_prompt, get_shape
    from tuner.pruning import get_method_class

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    shape = get_shape("small")
    ids = build_prompt(shape, torch.device("cpu"))
    hidden = torch.randn(1, ids.shape[1], shape.hidden, generator=torch.Generator().manual_seed(0))
    vision = ids == shape.vision_token_id
    for method, oracle in (("divprune", divprune_kept), ("cdpruner", cdpruner_kept)):
        for budget in shape.budgets():
            ctx = SelectionContext(hidden_states=hidden, vision_mask=vision, attention_mask=torch.ones_like(vision),
                                   input_ids=ids, budgets=[budget], final_norm=torch.nn.Identity())
            selector = get_method_class(method)(tuner.PruningConfig(method=method, budget=budget))
            runs = {"before": functools.partial(oracle, ctx), "now": functools.partial(selector.select, ctx)}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for round_ in range(13):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run()
                    if round_ >= 2:  # two warm-up rounds
                        times[name].append((time.perf_counter() - started) * 1e3)
            before, now = (statistics.median(times[name]) for name in runs)
            print(f"{method} {budget}: before {before:.2f} ms, now {now:.2f} ms, {before / now:.2f}x")


if __name__ == "__main__":
    main()
