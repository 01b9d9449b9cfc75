"""`dart`: duplication-aware token reduction (Wen et al., 2025), via `tuner.pruning.dart.dart_select`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from tuner.config.options import Option, PaperSetting
from tuner.pruning.base import Needs, PruningMethod, Selection, SelectionContext
from tuner.pruning.dart import PIVOT_METRICS, PIVOT_ORDERS, QUOTA_RULES, dart_select, reference_quota
from tuner.pruning.registry import register_method

if TYPE_CHECKING:
    from tuner.config import PruningConfig


FAMILY_RULE = "family"  # quota_rule value: the loaded model family's reference rule
HIDDEN_PREFIX = "hidden_"  # pivot metrics on the stage's input hidden states instead of keys
HIDDEN_PIVOT_METRICS = tuple(HIDDEN_PREFIX + metric for metric in PIVOT_METRICS)


@register_method("dart")
class DART(PruningMethod):
    """Keeps the vision tokens least similar to a few norm-ranked pivots; duplication over importance.

    Options: `n_image_pivots` / `n_text_pivots` (4 + 4 in the paper; searched by default over 1-8 and 0-8),
    `pivot_order` (reference | rank | position, docs/design/DART.md §3), `pivot_metric`: l1 | l2 | l1_min | l2_min rank
    pivots on layer K-1's post-RoPE keys (the paper's K-norm); hidden_l1 | hidden_l2 | hidden_l1_min |
    hidden_l2_min on the hidden states entering layer K, so no keys are captured (before layer 0 no keys exist,
    so pivots come from the projected features). For the official code's counts, either a fixed `quota` per
    pivot or a `quota_rule` (llava15 | llava_next | qwen, or `family`: the model family's own,
    `Family.reference_quota_rule`) with `max_num_trunction` and
    `retain_tokens` as in the reference. Without them, exactly the config's budget is kept.
    A row with fewer vision tokens than `n_image_pivots` takes all of them as its image pivots (warned once per
    method instance); its budget is still met.
    """

    needs = Needs(keys=True)
    option_specs = {
        "n_image_pivots": Option(int, 4, low=0, search={"low": 1, "high": 8},
                                 vision_bound=True, help="pivots chosen among the vision tokens (largest key norms)"),
        "n_text_pivots": Option(int, 4, low=0, search={"low": 0, "high": 8},
                                help="pivots chosen among the text tokens"),
        "pivot_order": Option(str, "reference", choices=PIVOT_ORDERS, help="the order pivots are visited in"),
        "pivot_metric": Option(str, "l1", choices=PIVOT_METRICS + HIDDEN_PIVOT_METRICS,
                               help="how pivots are ranked and similarity measured (keys, or hidden_*: states)"),
        "quota": Option(int, None, low=0, nullable=True, help="tokens kept per pivot (the official code's)"),
        "quota_rule": Option(str, None, choices=(*QUOTA_RULES, FAMILY_RULE), nullable=True,
                             help="the official code's per-pivot quota rule"),
        "max_num_trunction": Option(int, 128, low=0, nullable=True, help="the reference rules' truncation"),
        "retain_tokens": Option(int, 320, low=0, help="the reference rules' retained tokens"),
    }
    paper_setting = PaperSetting(layer=2, keep_ratio=0.25, budget=128,
                                 options={"n_image_pivots": 4, "n_text_pivots": 4, "pivot_order": "reference"})

    @classmethod
    def requires_amount(cls, config: PruningConfig) -> bool:
        return not _reference_mode(config.options)

    @classmethod
    def validate(cls, config: PruningConfig) -> None:
        super().validate(config)
        options = config.options
        if options["n_image_pivots"] + options["n_text_pivots"] < 1:
            raise ValueError("dart options n_image_pivots + n_text_pivots must be >= 1")
        if not _reference_mode(options):
            return
        if options.get("quota") is not None and options.get("quota_rule") is not None:
            raise ValueError("dart options: give quota or quota_rule, not both")
        if config.budget is not None:
            raise ValueError("dart: budget keeps an exact count; it cannot be combined with quota/quota_rule")
        rule = options.get("quota_rule")
        if rule is not None:
            _check_ratio(rule, config)

    @classmethod
    def reads_previous_layer(cls, config: PruningConfig) -> bool:
        """Key metrics read layer K-1's keys; the hidden_* metrics only the states entering layer K (so K = 0 works)."""
        return not _ranks_on_hidden_states(config.options)

    def __init__(self, config: PruningConfig) -> None:
        super().__init__(config)
        self.needs = Needs(keys=not _ranks_on_hidden_states(self.options))  # the hooks capture no keys then
        self._warned_pivots = False

    def bind_family(self, family: Any) -> None:
        """Resolve `quota_rule: family` to the family's reference rule (an error if it has none)."""
        if self.options["quota_rule"] != FAMILY_RULE:
            return
        rule = family.reference_quota_rule
        if rule is None:
            raise ValueError(f"dart quota_rule 'family': the {family.name} family has no reference quota rule; "
                             f"give one of {QUOTA_RULES}")
        _check_ratio(rule, self.config)
        self.options["quota_rule"] = rule

    def select(self, ctx: SelectionContext) -> Selection:
        self._warn_short_rows(ctx.vision_mask.sum(1).tolist())
        with torch.no_grad():
            norm_states = ctx.final_norm(ctx.hidden_states)
        pivot_states = ctx.keys if self.needs.keys else ctx.hidden_states
        common = {key: self.options[key] for key in ("n_image_pivots", "n_text_pivots", "pivot_order")}
        common["pivot_metric"] = self.options["pivot_metric"].removeprefix(HIDDEN_PREFIX)
        if not _reference_mode(self.options):
            return Selection(dart_select(norm_states, pivot_states, ctx.vision_mask, budget=ctx.budgets,
                                         attention_mask=ctx.attention_mask, **common))
        kept = []  # reference mode: the quota depends on each row's vision count, so rows go one by one
        for row in range(len(ctx.budgets)):
            quota = self._quota(int(ctx.vision_mask[row].sum()))
            kept += dart_select(norm_states[row:row + 1], pivot_states[row:row + 1], ctx.vision_mask[row:row + 1],
                                quota=quota, attention_mask=ctx.attention_mask[row:row + 1], **common)
        return Selection(kept)

    def _warn_short_rows(self, n_vision: list[int]) -> None:
        """Warn, once, that a row has fewer vision tokens than `n_image_pivots` (`dart_select` then takes them all)."""
        wanted = self.options["n_image_pivots"]
        short = [(row, n) for row, n in enumerate(n_vision) if 0 < n < wanted]
        if short and not self._warned_pivots:
            self._warned_pivots = True
            row, n = short[0]
            warnings.warn(f"dart option n_image_pivots={wanted} exceeds the {n} vision tokens of batch row {row}; "
                          "such a row uses all its vision tokens as image pivots (warned once)", stacklevel=2)

    def _quota(self, n_vision: int) -> int:
        if self.options["quota"] is not None:
            return self.options["quota"]
        if n_vision == 0:
            return 0
        return max(0, reference_quota(
            self.options["quota_rule"], n_vision, n_image_pivots=min(self.options["n_image_pivots"], n_vision),
            n_text_pivots=self.options["n_text_pivots"], keep_ratio=self.config.keep_ratio,
            max_num_trunction=self.options["max_num_trunction"], retain_tokens=self.options["retain_tokens"]))


def _ranks_on_hidden_states(options: dict) -> bool:
    """Whether the pivot metric reads the hidden states entering layer K rather than layer K-1's keys."""
    return str(options.get("pivot_metric", "l1")).startswith(HIDDEN_PREFIX)


def _reference_mode(options: dict) -> bool:
    """Whether the options ask for the official code's per-pivot quotas instead of an exact budget."""
    return options.get("quota") is not None or options.get("quota_rule") is not None


def _check_ratio(rule: str, config: PruningConfig) -> None:
    """The rules that derive the quota from keep_ratio need one."""
    ratio_needed = rule == "qwen" or (rule == "llava15" and config.options.get("max_num_trunction", 128) is None)
    if ratio_needed and config.keep_ratio is None:
        raise ValueError(f"dart quota_rule {rule!r} derives the quota from keep_ratio; set keep_ratio")
