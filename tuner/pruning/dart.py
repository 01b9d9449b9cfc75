"""DART selection (duplication-aware token reduction) as a pure function, exactly as `docs/design/DART.md` §2-3.

Pivots are ranked by the L1 norm of layer K-1's post-RoPE keys; each pivot, visited in the reference
order, then takes its quota of the remaining vision tokens least cosine-similar to itself, measured on
the final-normed output of layer K-1. Nothing here knows about hooks or model families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PIVOT_ORDERS = ("reference", "rank", "position")  # how DART visits its pivots (docs/design/DART.md §3)
PIVOT_METRICS = ("l1", "l2", "l1_min", "l2_min")
QUOTA_RULES = ("llava15", "llava_next", "qwen")


def reference_quota(
    rule: str,
    n_vision: int,
    *,
    n_image_pivots: int = 4,
    n_text_pivots: int = 4,
    keep_ratio: float | None = None,
    max_num_trunction: int | None = 128,
    retain_tokens: int = 320,
) -> int:
    """Per-pivot quota the official DART code derives for a model family, to reproduce the paper's counts.

    `llava15`: floor(B / P) with B = max_num_trunction, or L * keep_ratio when that is None;
    `llava_next`: floor(min(retain_tokens, L - n_image_pivots) / P); `qwen`: int(L * keep_ratio / P).
    With 4+4 pivots, LLaVA-1.5's "64/128/192 tokens" are quotas 8/16/24, i.e. 68/132/196 kept.
    """
    n_pivots = n_image_pivots + n_text_pivots
    if n_pivots < 1:
        raise ValueError(f"n_image_pivots + n_text_pivots must be >= 1, got {n_pivots}")
    if n_vision < 0:
        raise ValueError(f"n_vision must be >= 0, got {n_vision}")

    def needs_ratio() -> float:
        if keep_ratio is None or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"quota rule {rule!r} needs keep_ratio in (0, 1], got {keep_ratio!r}")
        return keep_ratio

    if rule == "llava15":
        budget = max_num_trunction if max_num_trunction is not None else n_vision * needs_ratio()
        return int(math.floor(budget / n_pivots))
    if rule == "llava_next":
        return int(math.floor(min(retain_tokens, n_vision - n_image_pivots) / n_pivots))
    if rule == "qwen":
        return int(n_vision * needs_ratio() / n_pivots)
    raise ValueError(f"unknown quota rule {rule!r}; expected one of {QUOTA_RULES}")


def dart_select(
    norm_states: torch.Tensor,
    key_states: torch.Tensor,
    vision_mask: torch.Tensor,
    *,
    quota: int | None = None,
    budget: int | Sequence[int] | None = None,
    n_image_pivots: int = 4,
    n_text_pivots: int = 4,
    attention_mask: torch.Tensor | None = None,
    pivot_order: str = "reference",
    pivot_metric: str = "l1",
) -> list[torch.LongTensor]:
    """Kept vision positions per row (ascending), chosen by DART.

    `norm_states` [B, N, D] is what duplication (cosine) is measured on, `key_states` [B, N, F] what pivots
    are ranked on, `vision_mask` [B, N] marks vision tokens, `attention_mask` [B, N] is 0 on padding.
    Give exactly one of `quota` (every pivot takes q tokens; the reference mode) or `budget` (keep exactly
    b vision tokens per row; an int or one per row). Rows are independent.
    """
    _check_inputs(norm_states, key_states, vision_mask, attention_mask, quota, budget,
                  n_image_pivots, n_text_pivots, pivot_order, pivot_metric)
    batch = norm_states.shape[0]
    budgets = [budget] * batch if isinstance(budget, int) or budget is None else list(budget)

    valid = vision_mask.new_ones(vision_mask.shape) if attention_mask is None else attention_mask.bool()
    scores = _pivot_scores(key_states, pivot_metric)
    kept: list[torch.LongTensor] = []
    for row in range(batch):
        kept.append(_select_row(
            norm_states[row], scores[row], vision_mask[row].bool() & valid[row], valid[row],
            quota=quota, budget=budgets[row], n_image_pivots=n_image_pivots,
            n_text_pivots=n_text_pivots, pivot_order=pivot_order,
        ))
    return kept


def _pivot_scores(key_states: torch.Tensor, metric: str) -> torch.Tensor:
    """Pivot score per token: larger is a better pivot (the `_min` metrics negate the norm)."""
    keys = key_states.float()
    norm = keys.abs().sum(-1) if metric.startswith("l1") else keys.norm(dim=-1)
    return -norm if metric.endswith("_min") else norm


def _select_row(
    norm_states: torch.Tensor,
    scores: torch.Tensor,
    vision: torch.Tensor,
    valid: torch.Tensor,
    *,
    quota: int | None,
    budget: int | None,
    n_image_pivots: int,
    n_text_pivots: int,
    pivot_order: str,
) -> torch.LongTensor:
    """DART on one sequence: pivots, then greedy per-pivot picks of the least similar candidates."""
    vision_pos = vision.nonzero().squeeze(1)
    n_vision = vision_pos.numel()
    if n_vision == 0:
        return vision_pos
    if budget is not None and budget >= n_vision:
        return vision_pos

    image_pivots = vision_pos[_top(scores[vision_pos], n_image_pivots)].tolist()
    after_image = valid.clone()
    after_image[: int(vision_pos[-1]) + 1] = False
    text_pos = after_image.nonzero().squeeze(1)
    text_pivots = text_pos[_top(scores[text_pos], n_text_pivots)].tolist()

    if budget is not None and budget <= len(image_pivots):
        return torch.tensor(sorted(image_pivots[:budget]), dtype=torch.long, device=vision_pos.device)

    # Positions as in the unpadded prompt: the reference order depends on the integer values.
    padding = int(valid.int().argmax())
    pivots = _visiting_order(image_pivots, text_pivots, scores, pivot_order, padding)
    if not pivots:  # no image pivots asked for and no text after the image: nothing can pick
        return vision_pos[:0]
    if budget is not None:
        picks = budget - len(image_pivots)
        quotas = [picks // len(pivots) + (i < picks % len(pivots)) for i in range(len(pivots))]
    else:
        quotas = [quota] * len(pivots)

    # Cosine of every pivot against every vision token, in one matmul; the greedy loop only masks.
    unit = F.normalize(norm_states.float(), dim=-1)
    similarity = unit[pivots] @ unit[vision_pos].T  # [n_pivots, n_vision]
    available = torch.ones(n_vision, dtype=torch.bool, device=vision_pos.device)
    available[torch.searchsorted(vision_pos, torch.tensor(image_pivots, dtype=torch.long,
                                                         device=vision_pos.device))] = False
    remaining = n_vision - len(image_pivots)
    picked = []
    for row, take in zip(similarity, quotas):
        take = min(take, remaining)  # a dry pool gives what is left, never an error
        if take <= 0:
            continue
        # Stable ascending sort: ties go to the lower position, unavailable tokens sort last.
        order = torch.sort(row.masked_fill(~available, math.inf), stable=True).indices[:take]
        available[order] = False
        remaining -= take
        picked.append(order)
    kept = torch.tensor(image_pivots, dtype=torch.long, device=vision_pos.device)
    if picked:
        kept = torch.cat([kept, vision_pos[torch.cat(picked)]])
    return kept.sort().values


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, best first (all of them if fewer than k)."""
    return values.topk(min(k, values.numel())).indices


def _visiting_order(image_pivots: list[int], text_pivots: list[int], scores: torch.Tensor,
                    order: str, padding: int) -> list[int]:
    """Order in which pivots take their quotas; `reference` is the official code's CPython set order.

    The set is built from positions in the unpadded prompt (what the batch-1 reference saw), so left
    padding cannot change the order.
    """
    if order == "reference":
        return [p + padding for p in set(p - padding for p in image_pivots + text_pivots)]
    unique = list(dict.fromkeys(image_pivots + text_pivots))
    if order == "position":
        return sorted(unique)
    return sorted(unique, key=lambda p: -float(scores[p]))  # "rank": best score first


def _check_inputs(norm_states, key_states, vision_mask, attention_mask, quota, budget,
                  n_image_pivots, n_text_pivots, pivot_order, pivot_metric) -> None:
    """Clear errors for malformed arguments, before any compute."""
    if norm_states.dim() != 3:
        raise ValueError(f"norm_states must be [B, N, D], got shape {tuple(norm_states.shape)}")
    batch, n_tokens = norm_states.shape[:2]
    if key_states.dim() != 3 or key_states.shape[:2] != (batch, n_tokens):
        raise ValueError(f"key_states must be [B, N, F] with B, N = {batch}, {n_tokens}; "
                         f"got shape {tuple(key_states.shape)}")
    if tuple(vision_mask.shape) != (batch, n_tokens):
        raise ValueError(f"vision_mask must be [B, N] = [{batch}, {n_tokens}], got {tuple(vision_mask.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, n_tokens):
        raise ValueError(f"attention_mask must be [B, N] = [{batch}, {n_tokens}], "
                         f"got {tuple(attention_mask.shape)}")
    if (quota is None) == (budget is None):
        raise ValueError("give exactly one of quota (reference mode) or budget (exact kept count)")
    if quota is not None and (not isinstance(quota, int) or quota < 0):
        raise ValueError(f"quota must be an int >= 0, got {quota!r}")
    if budget is not None:
        budgets = [budget] if isinstance(budget, int) else list(budget)
        if not isinstance(budget, int) and len(budgets) != batch:
            raise ValueError(f"budget has {len(budgets)} entries for a batch of {batch}")
        if any(not isinstance(b, int) or b < 0 for b in budgets):
            raise ValueError(f"budget must be ints >= 0, got {budget!r}")
    for name, value in (("n_image_pivots", n_image_pivots), ("n_text_pivots", n_text_pivots)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if n_image_pivots + n_text_pivots < 1:
        raise ValueError("n_image_pivots + n_text_pivots must be >= 1")
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
    if pivot_metric not in PIVOT_METRICS:
        raise ValueError(f"pivot_metric must be one of {PIVOT_METRICS}, got {pivot_metric!r}")
