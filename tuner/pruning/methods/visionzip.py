"""`visionzip`: dominant tokens by vision-tower attention plus merged contextual tokens (Yang et al., CVPR 2025).

VisionZip (arXiv 2412.04467; official code dvlab-research/VisionZip, `visionzip/clip_encoder.py`) ranks the
vision tokens by the attention they get in the vision-tower layer whose output the model uses (LLaVA: the CLS
query at the second-to-last CLIP layer, summed over heads) and keeps the top ones ("dominant"). Of the rest, in
order, every `step`-th token (step = rest // contextual) becomes a target; each other token joins the target
whose key (that layer's keys averaged over heads, L2-normalised) has the largest dot product with its own, and
a target's state becomes its own plus the mean of the states that joined it ("contextual").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tuner.config.options import Option
from tuner.pruning.base import Needs, PruningMethod, Selection, SelectionContext
from tuner.pruning.registry import register_method

if TYPE_CHECKING:
    from tuner.config import PruningConfig

PAPER_CONTEXTUAL_SHARE = 10 / 64  # the paper's splits: 54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192


@register_method("visionzip")
class VisionZip(PruningMethod):
    """Keeps `budget` vision tokens: dominant ones by vision-tower attention, contextual ones merged from the rest.

    Option `contextual_share` in [0, 1) (default 10/64, the paper's split): budget * share (rounded half up) of
    the kept tokens are contextual, the others dominant. A contextual token sits at its target's slot and position (the
    target is itself one of the tokens it summarises); the states it merges are those entering the stage's layer.
    """

    needs = Needs(vision_saliency=True)
    default_layer = 0  # it prunes before the language model
    option_specs = {"contextual_share": Option(float, PAPER_CONTEXTUAL_SHARE, low=0.0, high=1.0, high_open=True,
                                               search={"low": 0.0, "high": 0.5},
                                               help="share of the kept tokens that are merged contextual ones")}

    @classmethod
    def validate(cls, config: PruningConfig) -> None:
        super().validate(config)
        share = config.options.get("contextual_share", PAPER_CONTEXTUAL_SHARE)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) \
                or not 0.0 <= share < 1.0:
            raise ValueError(f"visionzip option contextual_share must be a number in [0, 1), got {share!r}")

    def bind_family(self, family: Any) -> None:
        """Only families that map their vision tower's attention onto their vision tokens can run it."""
        if family.vision_saliency_query is None:
            raise ValueError(f"visionzip does not support family {family.name} yet (it needs the vision tower's "
                             "attention mapped to the language model's vision tokens)")

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant, contextual) counts of a row keeping `budget` vision tokens."""
        contextual = math.floor(budget * float(self.options["contextual_share"]) + 0.5)  # half up: 16 -> 13 + 3
        return budget - contextual, contextual

    def select(self, ctx: SelectionContext) -> Selection:
        kept, states, merged = [], [], False
        for row, budget in enumerate(ctx.budgets):
            vision = ctx.vision_positions(row)
            dominant, contextual = self.split(budget)
            local, row_states, row_merged = visionzip_select(
                ctx.vision_saliency[row, vision], ctx.vision_keys[row, vision], ctx.hidden_states[row, vision],
                dominant, contextual)
            kept.append(vision[local])
            states.append(row_states.to(ctx.hidden_states.dtype))
            merged |= row_merged
        return Selection(kept, states if merged else None)


def visionzip_select(saliency: torch.Tensor, keys: torch.Tensor, states: torch.Tensor, n_dominant: int,
                     n_contextual: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One row: (kept indices ascending, their states in float32, whether any state was merged).

    Dominant: the `n_dominant` largest `saliency` (ties to the lower index). The M others, in order, give the
    targets at 0, step, 2 step, ... (step = max(1, M // n_contextual), the first n_contextual); every other token
    goes to the target of largest normalised-key dot product (ties to the first target); a target's state becomes
    its own plus the mean of its members'.
    """
    n = saliency.numel()
    if n_dominant + n_contextual > n:
        raise ValueError(f"visionzip keeps {n_dominant} + {n_contextual} tokens of a row with only {n}")
    order = torch.sort(saliency.float(), descending=True, stable=True).indices
    dominant = order[:n_dominant]
    is_rest = torch.ones(n, dtype=torch.bool, device=saliency.device)
    is_rest[dominant] = False
    rest = is_rest.nonzero().squeeze(1)
    if n_contextual == 0:
        kept = dominant.sort().values
        return kept, states[kept].float(), False
    step = max(1, rest.numel() // n_contextual)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:n_contextual]] = True
    targets, members = rest[is_target], rest[~is_target]
    merged_states = states[targets].float()
    if members.numel():
        metric = keys.float() / keys.float().norm(dim=-1, keepdim=True)
        assignment = (metric[members] @ metric[targets].T).argmax(dim=1)
        sums = torch.zeros_like(merged_states).index_add_(0, assignment, states[members].float())
        counts = torch.bincount(assignment, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
        merged_states = merged_states + sums / counts
    kept, slot = torch.cat([dominant, targets]).sort()
    all_states = torch.cat([states[dominant].float(), merged_states])[slot]
    return kept, all_states, bool(members.numel())
