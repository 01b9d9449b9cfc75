"""`cdpruner`: vision tokens of maximal conditional diversity, by greedy MAP inference of a conditional DPP.

CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967; official code github.com/Theia-4869/CDPruner) builds
the kernel L_ij = w_i * cos(x_i, x_j) * w_j over a row's vision tokens, where cos is the similarity of their
features and w_i weighs token i by its relevance to the instruction, and keeps the subset that greedily
maximises log det L_S (Chen et al.'s fast greedy MAP inference, NeurIPS 2018: one Cholesky-like update per pick).

Relevance, as in the official code: r_i = the mean over instruction tokens t of cos(x_i, t), min-max normalised
over the row's vision tokens as (r - min + 1e-6) / (max - min). Weights: w = r (the official code's active
path; option `theta` None) or w = exp(theta / (2 (1 - theta)) * r) (the official code's optional theta weighting,
option `theta` in [0, 1); 0 ignores the instruction). log det L_S = sum_{i in S} 2 log w_i + log det S_S, so
relevance and diversity trade off in one objective.

What differs from the official code, and why:
- Relevance lives in the model's own embedding space. The official code scores it with CLIP's text tower on
  the question and CLIP's projected patch embeddings, which a VLM does not carry. Here x_i are the vision
  tokens' hidden states entering the stage's layer K and the instruction tokens are the row's valid non-vision
  tokens after its last vision token (the question and the chat template's closing tokens), with their states
  at the same input. At K = 0 those are the projected vision features and the instruction tokens' input
  embeddings. A row without instruction tokens (the prompt ends with the image), or whose relevance is
  constant, weighs every token equally: a plain DPP on similarity. The CLIP-text variant is not built (no
  CLIP text tower can be loaded here).
- The official code negates the CLIP cosine before normalising (it ranks tokens less similar to the text
  higher); `negate_relevance: true` applies that sign here too. The default keeps the sign the name states:
  more similar to the instruction, more relevant. Which sign suits the model's own space is an empirical
  question a study can search.
- Min and max are taken per row (the official code takes them over the whole batch), so rows are independent.
- A pick whose remaining gain is not positive (every candidate already spanned) updates nothing instead of
  dividing by zero; the budget is still met exactly, with distinct tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tuner.config.options import Option
from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.layer_inputs import gather_rows
from tuner.pruning.registry import register_method
from tuner.pruning.ties import earliest_near, row_cosine, tie_tolerance


@register_method("cdpruner")
class CDPruner(PruningMethod):
    """Keeps `budget` vision tokens per row: greedy MAP of the relevance-weighted similarity DPP (module docstring).

    Options: `theta` (None: weights are the min-max relevance, the official code's default; a number in [0, 1):
    weights exp(theta / (2 (1 - theta)) * relevance)); `negate_relevance` (the official code's sign).
    """

    default_layer = 0  # the paper prunes the projected vision features, before the language model

    option_specs = {"theta": Option(float, None, low=0.0, high=1.0, high_open=True, nullable=True,
                                    search={"low": 0.0, "high": 0.9},
                                    help="relevance weighting exp(theta / (2 (1 - theta)) r); null: min-max relevance"),
                    "negate_relevance": Option(bool, False, search=[False, True],
                                               help="flip the relevance sign (the official code's)")}

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        theta = config.options.get("theta")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0.0 <= theta < 1.0):
            raise ValueError(f"cdpruner option theta must be null or a number in [0, 1), got {theta!r}")
        negate = config.options.get("negate_relevance", False)
        if not isinstance(negate, bool):
            raise ValueError(f"cdpruner option negate_relevance must be true or false, got {negate!r}")

    def select(self, ctx: SelectionContext) -> Selection:
        positions, valid = ctx.padded_vision_positions()
        states = gather_rows(ctx.hidden_states, positions)
        unit = F.normalize(states.float(), dim=-1)
        instruction = instruction_mask(ctx.vision_mask.bool(), ctx.attention_mask.bool())
        relevance = instruction_relevance(unit, ctx.hidden_states, instruction)
        if self.options["negate_relevance"]:
            relevance = -relevance
        weights = relevance_weights(min_max(relevance, valid), self.options["theta"])
        counts = valid.sum(1).tolist()
        order = greedy_map_order(row_cosine(unit, valid), weights, valid,
                                 [b if b < n else 0 for b, n in zip(ctx.budgets, counts)])
        return Selection([positions[row, :n] if budget >= n else positions[row, order[row, :budget]].sort().values
                          for row, (budget, n) in enumerate(zip(ctx.budgets, counts))])


def instruction_mask(vision: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, N] True on each row's instruction tokens: valid non-vision tokens after its last vision token."""
    index = torch.arange(vision.shape[1], device=vision.device)
    last_vision = torch.where(vision, index, -1).amax(1, keepdim=True)
    return valid & ~vision & (index > last_vision)


def instruction_relevance(vision_unit: torch.Tensor, states: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """[B, V]: each vision token's mean cosine to its row's instruction tokens (0 for a row without any).

    `vision_unit` [B, V, D] holds the vision tokens' unit vectors, `states` [B, N, D] every token's state. The
    mean of the cosines is the dot product with the mean of the instruction tokens' unit vectors.
    """
    unit = F.normalize(states.float(), dim=-1) * instruction[..., None]
    mean = unit.sum(1) / instruction.sum(1, keepdim=True).clamp_min(1)
    return torch.einsum("bvd,bd->bv", vision_unit, mean)


def min_max(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, (v - min + 1e-6) / (max - min) over the valid entries, as the official code normalises relevance;
    1 everywhere on a row whose values are all equal (nothing to rank)."""
    low = values.masked_fill(~valid, math.inf).amin(1, keepdim=True)
    high = values.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
    spread = high - low
    scaled = (values - low + 1e-6) / torch.where(spread > 0, spread, 1.0)
    return torch.where(spread > 0, scaled, 1.0)


def relevance_weights(relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """The kernel's per-token weights: the relevance itself (theta None) or exp(theta / (2 (1 - theta)) * r)."""
    if theta is None:
        return relevance
    return torch.exp(theta / (2 * (1 - theta)) * relevance)


def greedy_map_order(similarity: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                     budgets: list[int]) -> torch.Tensor:
    """Greedy MAP picks of the DPP with kernel L_ij = w_i S_ij w_j, in pick order: [B, T] (T = the largest budget).

    `similarity` [B, V, V] is each row's cosine matrix (`tuner.pruning.ties.row_cosine`: exactly symmetric, 1 on
    the diagonal, 0 at padding), `weights` [B, V] the tokens' weights. Each step adds the token j of largest gain
    d_j^2 = L_jj - |c_j|^2, the factor by which det L_S grows, then updates every gain with the new pick's
    orthogonalised row e = (L_j - c_j . C) / d_j (Chen et al., 2018). Ties, gains within rounding of the best
    (relative to the row's largest L_jj), go to the earlier token, so exact duplicates are decided by position,
    not by rounding. Row r's first `budgets[r]` picks are its selection; rows are independent.

    Only the picks' kernel rows are formed, (S_j * w_j) * w with the rounding of the whole kernel's: the same
    float32 operations on the same values as over the whole kernel, so the same picks. The step loop runs in
    numpy on CPU and in tensor operations elsewhere; both compute c_j . C with the same `torch.bmm` (its bits
    depend on its shapes, so it keeps them).
    """
    batch, width = valid.shape
    steps = max(budgets, default=0)
    if steps > width:
        raise ValueError(f"budgets {budgets} exceed the {width} tokens of the widest row")
    if steps == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=valid.device)
    weights = (weights * valid).float()
    gains = (torch.diagonal(similarity, dim1=1, dim2=2) * weights * weights).masked_fill(~valid, -math.inf)
    tolerance = tie_tolerance(gains.amax(1).clamp_min(torch.finfo(gains.dtype).tiny), gains)  # the row's scale
    if similarity.device.type == "cpu":
        return torch.from_numpy(_map_steps_numpy(similarity.numpy(), weights.numpy(), gains.numpy(),
                                                 tolerance.numpy()[:, 0], steps))
    return _map_steps_torch(similarity, weights, gains, tolerance, steps)


def _map_steps_torch(similarity: torch.Tensor, weights: torch.Tensor, gains: torch.Tensor, tolerance: torch.Tensor,
                     steps: int) -> torch.Tensor:
    """The greedy loop in tensor operations, every row in each step: no host synchronisation."""
    batch, width = gains.shape
    tiny = torch.finfo(gains.dtype).tiny
    directions = gains.new_zeros(steps, batch, width)  # c: each pick's orthogonalised kernel row
    by_row = directions.transpose(0, 1)  # [B, steps, V], a view
    flat_directions = directions.view(steps, batch * width)
    flat_similarity, flat_weights = similarity.reshape(batch * width, width), weights.view(-1)
    offsets = torch.arange(batch, device=gains.device) * width
    zero = gains.new_zeros(())
    picks = []
    for step in range(steps):
        pick = earliest_near(gains, tolerance)
        picks.append(pick)
        at = offsets + pick if batch > 1 else pick
        gain = gains.view(-1).index_select(0, at)
        coefficients = flat_directions[:step].index_select(1, at).T[:, None, :]  # [B, 1, step]: c_t at the pick
        spanned = torch.bmm(coefficients, by_row[:, :step])[:, 0]  # sum_t c_t[pick] c_t
        row = flat_similarity.index_select(0, at).mul_(flat_weights.index_select(0, at)[:, None]).mul_(weights)
        update = row.sub_(spanned).div_(gain.clamp_min(tiny).sqrt()[:, None])
        direction = directions[step]
        torch.where((gain > 0)[:, None], update, zero, out=direction)
        gains.sub_(direction.square())
        gains.view(-1).index_fill_(0, at, -math.inf)  # a picked token is never picked again
    return torch.stack(picks, 1)


def _map_steps_numpy(similarity: np.ndarray, weights: np.ndarray, gains: np.ndarray, tolerance: np.ndarray,
                     steps: int) -> np.ndarray:
    """The same loop on CPU in numpy, every row in each step: the same float32 operations, so the same picks, bit
    for bit. Two steps stay in torch, whose bits numpy does not share: c_j . C is the tensor loop's own
    `torch.bmm` call on directions shared with numpy (its rounding depends on its shapes, the batch's included),
    and sqrt d_j^2 is torch's float32 sqrt (not always correctly rounded on CPU)."""
    batch, width = gains.shape
    tiny = np.float32(np.finfo(np.float32).tiny)
    rows = np.arange(batch)
    current, tolerance = gains.copy(), tolerance[:, None]
    picks = np.zeros((batch, steps), dtype=np.int64)
    directions = torch.zeros(steps, batch, width)  # c: each pick's orthogonalised kernel row
    by_row, direction_array = directions.transpose(0, 1), directions.numpy()
    coefficients = torch.zeros(steps, batch)  # c_t at the pick, as the tensor loop lays them out
    coefficient_array, spanned = coefficients.numpy(), torch.zeros(batch, 1, width)
    spanned_array = spanned.numpy()[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):  # rows without a positive gain are discarded
        for step in range(steps):
            pick = np.argmax(current >= current.max(1, keepdims=True) - tolerance, 1)  # the earliest near-best
            picks[:, step] = pick
            gain = current[rows, pick]
            positive = gain > 0
            if positive.any():  # else every direction stays 0 and no gain changes
                update = similarity[rows, pick]
                np.multiply(update, weights[rows, pick][:, None], out=update)
                np.multiply(update, weights, out=update)
                if step:
                    coefficient_array[:step] = direction_array[:step, rows, pick]
                    torch.bmm(coefficients[:step].T[:, None, :], by_row[:, :step], out=spanned)
                    np.subtract(update, spanned_array, out=update)
                norm = torch.from_numpy(np.maximum(gain, tiny)).sqrt_().numpy()  # torch's float32 sqrt: its bits
                np.divide(update, norm[:, None], out=update)
                direction = direction_array[step]
                np.copyto(direction, update, where=positive[:, None])
                np.subtract(current, np.square(direction), out=current)
            current[rows, pick] = -np.inf  # a picked token is never picked again
    return picks
