"""`sparsevlm`: text-guided progressive pruning with recycling (Zhang et al., SparseVLM, arXiv 2410.04417, ICML 2025).

Semantics follow the official code (github.com/Gumpest/SparseVLMs, `llava/model/language_model/`
`modelling_sparse_llama.py`, `score.py`, `utils.py`; v1.5 on main, and the first release for the rank rule):
- Raters, chosen once per prompt from layer 0's input: with V the vision tokens' embeddings and T those of the text
  tokens after the last vision token, relevance = mean over vision tokens of softmax over text tokens of V T^T
  (unscaled, as in the code); the raters are the text tokens whose relevance is above the mean.
- Score, at each stage: layer K-1's attention (softmax, averaged over heads) of the rater queries over the vision
  tokens the stage holds, averaged over the raters.
- Count: the stage's amount (keep_ratio / budget) is the number of vision tokens it keeps, merged ones included
  (v1.5 keeps fixed per-layer counts, `official_schedule`). With option `rank_scale` (lambda) the paper's
  rank-based rule decides: it deletes floor(lambda * (L_v - rank(P))) of the stage's L_v vision tokens, P the
  [raters x vision] attention; the stage's amount, when given, is then a cap.
- Recycling: the top 30% (int(0.3 n) + 1) of the n pruned tokens by score are clustered into int(r / 10) + 1
  merged tokens by density-peak k-NN clustering on the hidden states entering layer K (k = the cluster count;
  density exp(-mean squared distance to the k nearest), distances L2 / sqrt(D); centres = the largest
  density x distance-to-a-denser-token; every token joins its nearest centre); a merged token is its cluster's
  mean. The stage keeps the top-scored tokens and the merged ones: the largest top count k with
  k + merged(L_v - k) = its count (when even k = 0 overshoots, nothing is recycled).

Deviations (the engine cannot insert tokens, and every method keeps original positions):
- A merged token takes the slot, hence the original RoPE position, of its cluster's centre, a pruned token that is
  re-kept with the cluster mean as its state. The official code appends merged tokens after the kept vision tokens
  and renumbers all positions 0..P-1.
- The official code breaks density ties with 1e-6 random noise; here an earlier recycled token (higher score, then
  lower position) counts as denser, and score ties go to the lower position, so a selection is reproducible.
- If no text token's relevance is above the mean (e.g. one text token), all of them rate (the official code would
  average an empty set); a prompt with no text after its last vision token is rated by all its text tokens.
- Rows are independent (batch > 1, left padding; the official code asserts batch 1), and all vision tokens of a
  row form one pool (several images).
"""

from __future__ import annotations

import math

import torch

from tuner.config import PruningConfig, Stage
from tuner.config.options import Option
from tuner.pruning.base import Needs, PromptInputs, PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method

# The official v1.5 schedule for LLaVA-1.5-7B (576 vision tokens, 32 layers): it prunes after layers 2, 6 and 15
# (so before K = 3, 7, 16) and keeps these top-scored counts there, plus the merged tokens, per RETAIN_TOKN.
OFFICIAL_LAYERS = (3, 7, 16)
OFFICIAL_TOP_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


@register_method("sparsevlm")
class SparseVLM(PruningMethod):
    """Vision tokens the text raters attend to most at layer K-1, the top pruned ones recycled into merged tokens.

    Options: `rank_scale` (null, or lambda in (0, 1]: the paper's rank-based deletion count, the amount becoming
    a cap) and `recycle` (default true; false keeps only top-scored tokens). See the module docstring.
    """

    needs = Needs(attention_rows=True, prompt_inputs=True)
    option_specs = {"rank_scale": Option(float, None, low=0.0, high=1.0, low_open=True, nullable=True,
                                         help="the paper's rank-based count (null: the amount decides)"),
                    "recycle": Option(bool, True, search=[True, False],
                                      help="merge recycled pruned tokens into cluster means")}

    @classmethod
    def requires_amount(cls, config: PruningConfig) -> bool:
        return config.options.get("rank_scale") is None

    @classmethod
    def validate(cls, config: PruningConfig) -> None:
        super().validate(config)
        scale = config.options.get("rank_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or not 0.0 < scale <= 1.0):
            raise ValueError(f"sparsevlm option rank_scale must be a number in (0, 1] or null, got {scale!r}")
        recycle = config.options.get("recycle", True)
        if not isinstance(recycle, bool):
            raise ValueError(f"sparsevlm option recycle must be true or false, got {recycle!r}")

    def select(self, ctx: SelectionContext) -> Selection:
        scale, recycle = self.options["rank_scale"], self.options["recycle"]
        kept, states, merged_any = [], [], False
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            hidden = ctx.hidden_states[row, vision]
            if vision.numel() == 0:
                kept.append(vision)
                states.append(hidden)
                continue
            raters = slots_of(ctx, row, rater_positions(ctx.prompt, row))
            relation = ctx.attention_rows(row, raters).mean(0)[:, vision]  # [raters, L_v], mean over heads
            total = budget if scale is None else min(budget, rank_keep_count(relation, scale))
            top, centres, merged = keep_and_recycle(relation.mean(0), hidden, total, recycle=recycle)
            order = torch.cat([top, centres]).sort()
            kept.append(vision[order.values])
            states.append(torch.cat([hidden[top], merged.to(hidden.dtype)])[order.indices])
            merged_any = merged_any or centres.numel() > 0
        return Selection(kept, states if merged_any else None)


def rater_positions(prompt: PromptInputs, row: int) -> torch.Tensor:
    """Original positions of one row's raters: text tokens after its last vision token with above-mean relevance."""
    valid, vision = prompt.attention_mask[row], prompt.vision_mask[row]
    text = valid & ~vision
    text[:int(vision.nonzero().max()) + 1] = False
    if not bool(text.any()):
        text = valid & ~vision
    text_positions = text.nonzero().squeeze(1)
    relevance = rater_relevance(prompt.embeddings[row, vision], prompt.embeddings[row, text_positions])
    chosen = relevance > relevance.mean()
    return text_positions[chosen] if bool(chosen.any()) else text_positions


def rater_relevance(vision_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
    """Relevance of each text token to the image: softmax over text of vision @ text^T, averaged over vision."""
    return (vision_states.float() @ text_states.float().T).softmax(-1).mean(0)


def slots_of(ctx: SelectionContext, row: int, positions: torch.Tensor) -> torch.Tensor:
    """The slots of `ctx` that hold the given original positions of one row (tokens the stage still holds)."""
    valid = ctx.attention_mask[row].nonzero().squeeze(1)
    held = ctx.original_positions()[row, valid].to(positions.device)  # ascending over the valid slots
    index = torch.searchsorted(held, positions).clamp(max=held.numel() - 1)
    if not torch.equal(held[index], positions):
        raise RuntimeError("a rater token is not among the tokens this stage holds")
    return valid[index.to(valid.device)]


def rank_keep_count(relation: torch.Tensor, scale: float) -> int:
    """The paper's adaptive count: L_v - floor(scale * (L_v - rank(P))) of P's L_v columns, at least 1."""
    n_vision = relation.shape[1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    return max(1, n_vision - math.floor(scale * (n_vision - rank)))


def recycle_counts(n_pruned: int) -> tuple[int, int]:
    """(recycled, merged) for a stage pruning n tokens: the top int(0.3 n) + 1, clustered into int(r / 10) + 1."""
    if n_pruned <= 0:
        return 0, 0
    recycled = 3 * n_pruned // 10 + 1
    return recycled, recycled // 10 + 1


def split_count(n_vision: int, total: int) -> int:
    """Top-scored tokens k to keep so that k + merged(n_vision - k) == total; total itself if none fits."""
    if total >= n_vision:
        return n_vision
    for top in range(total, -1, -1):
        if top + recycle_counts(n_vision - top)[1] <= total:
            return top  # the count grows by 0 or 1 per token, so the first one that fits hits `total` exactly
    return total


def keep_and_recycle(scores: torch.Tensor, hidden: torch.Tensor, total: int, *, recycle: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top indices, centre indices, merged states [c, D]) of one row's vision tokens, `total` kept in all.

    Indices are into `scores` / `hidden` (the row's vision tokens in order); ties go to the lower index.
    """
    n_vision = scores.numel()
    by_score = torch.sort(scores.float(), descending=True, stable=True).indices
    top_count = split_count(n_vision, total) if recycle else min(total, n_vision)
    top = by_score[:top_count]
    recycled, n_merged = recycle_counts(n_vision - top_count)
    if not recycle or top_count + n_merged != total or n_merged == 0:
        return top, top.new_zeros(0), hidden.new_zeros(0, hidden.shape[-1]).float()
    pool = by_score[top_count:top_count + recycled]  # the best-scored pruned tokens, best first
    centres, assignment = density_peak_clusters(hidden[pool].float(), n_merged)
    merged = hidden.new_zeros(n_merged, hidden.shape[-1], dtype=torch.float32).index_add_(
        0, assignment, hidden[pool].float())
    merged = merged / torch.bincount(assignment, minlength=n_merged)[:, None]
    return top, pool[centres], merged


def density_peak_clusters(states: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [c] best first, cluster of every token [r]) by k-NN density peaks with k = c (TCFormer's DPC-kNN).

    Distances are L2 / sqrt(D); density exp(-mean squared distance to the k nearest, itself included); a token's
    peak distance is that to its nearest denser token (the densest: the largest distance); centres are the largest
    density x peak distance; each token joins its nearest centre (ties: the better centre). Density ties: the
    earlier token is denser.
    """
    count, dim = states.shape
    distance = pairwise_distances(states) / math.sqrt(dim)
    nearest = distance.topk(n_clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    index = torch.arange(count, device=states.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    peak = torch.where(denser, distance, distance.max()).min(-1).values
    centres = torch.sort(peak * density, descending=True, stable=True).indices[:n_clusters]
    assignment = distance[:, centres].argmin(-1)
    assignment[centres] = torch.arange(n_clusters, device=states.device)
    return centres, assignment


def pairwise_distances(states: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [r, r] in float64 through one matrix product (BLAS-fast), centred first so the large
    component hidden states share cancels before squaring; exactly symmetric (mutual nearest neighbours must tie
    in density, which the tie rule then settles) with an exact 0 diagonal."""
    centred = states.double() - states.double().mean(0)
    squared = centred.pow(2).sum(-1)
    distance = (squared[:, None] + squared[None] - 2 * centred @ centred.T).clamp_min_(0)
    distance = (distance + distance.T) / 2
    return distance.fill_diagonal_(0).sqrt()


def official_schedule(retain_tokens: int, n_vision: int = 576) -> PruningConfig:
    """The official v1.5 schedule for `RETAIN_TOKN` 192 / 128 / 96 / 64 on LLaVA-1.5 (576 vision tokens, 32 layers).

    Stages before layers 3, 7 and 16 keep the official top counts plus their merged tokens (192: 300 + 9 = 309,
    200 + 4 = 204, 110 + 3 = 113). RETAIN_TOKN is the vision-token count averaged over the 32 layers, not the
    count the last stage keeps.
    """
    if retain_tokens not in OFFICIAL_TOP_COUNTS:
        raise ValueError(f"official sparsevlm schedules exist for {sorted(OFFICIAL_TOP_COUNTS)} tokens, "
                         f"got {retain_tokens!r}")
    budgets, held = [], n_vision
    for top in OFFICIAL_TOP_COUNTS[retain_tokens]:
        top = min(top, held - 1)  # the official code always prunes at least one token
        held = top + recycle_counts(held - top)[1]
        budgets.append(held)
    first, *later = zip(OFFICIAL_LAYERS, budgets)
    return PruningConfig(method="sparsevlm", layer=first[0], budget=first[1],
                         stages=tuple(Stage(layer, budget=budget) for layer, budget in later))
