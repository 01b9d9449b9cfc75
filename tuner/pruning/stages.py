"""The per-stage plan of a pruning schedule: which layers a stage owns, which tokens they hold, what they get.

A schedule prunes at layers K_0 < K_1 < ...; stage j owns layers [K_j, K_{j+1}) (the last one up to the top).
Stage j selects among the tokens stage j-1 kept, in the left-padded slots those layers hold, and its answer is
composed back into ORIGINAL prompt positions (`TokenView`), which is what rotary tables, the family's per-token
state and its extra hooks are indexed by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tuner.config import PruningConfig
from tuner.models.families import PrunedPrefill
from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.layer_inputs import gather_rows


@dataclass
class StageRunner:
    """One stage bound to a model: its layers [start, end), its one-stage config, its method and its capture."""

    index: int
    start: int
    end: int
    config: PruningConfig
    method: PruningMethod
    capture: AttentionCapture | None = None

    def select(self, context: SelectionContext) -> Selection:
        """Run the method on `context`, with what was captured at layer start - 1, then drop the capture."""
        capture = self.capture
        if capture is not None:
            context.keys = capture.take_keys()
            context.last_row_attention = capture.last_row_attention
            if capture.want_rows:
                context.attention_rows = capture.attention_rows
        try:
            with torch.no_grad():
                return self.method.select(context)
        finally:
            if capture is not None:
                capture.clear()

    def drop_capture(self) -> None:
        """Forget what was captured at layer start - 1 without selecting (a continued request reuses its choice)."""
        if self.capture is not None:
            self.capture.clear()

    def remove(self) -> None:
        """Restore the captured attention module (safe to call twice)."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None


@dataclass(frozen=True)
class TokenView:
    """The tokens a pruned stage's layers hold: per row its original prompt positions, left-padded.

    `index` [B, P] holds original positions (padding slots point at some position and are masked), `valid`
    [B, P] is False on padding slots.
    """

    index: torch.Tensor
    valid: torch.Tensor

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """A [B, N] per-token tensor of the prompt at this view's slots: [B, P]."""
        return values.gather(1, self.index)

    def prefill(self, length: int) -> PrunedPrefill:
        """This view as the family's extra hooks see it (original positions of a prompt of `length` tokens)."""
        return PrunedPrefill(gather_index=self.index, valid=self.valid, length=length)


@dataclass
class ForwardPlan:
    """Substitutions for the layers of one stage during one forward."""

    masks: dict[str, Any]
    gather_index: torch.Tensor | None = None  # [B, P] original positions, prefill only
    hidden_states: torch.Tensor | None = None  # [B, P, D] prefill only
    gathered_rotary: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    pruned: PrunedPrefill | None = None  # prefill only

    def rotary_at_kept(self, rotary: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        """(cos, sin) at the kept original positions, gathered once per stage per forward per distinct table."""
        if rotary is None:
            return None
        key = id(rotary[0])
        if key not in self.gathered_rotary:
            self.gathered_rotary[key] = tuple(gather_rows(t, self.gather_index) for t in rotary)
        return self.gathered_rotary[key]


def selected_slots(selection: Selection, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every selected vision slot, row by row in the order of `kept_vision` (and `new_states`)."""
    cols = torch.cat([k.reshape(-1) for k in selection.kept_vision]).to(device, torch.long)
    rows = torch.cat([torch.full((k.numel(),), row, device=device, dtype=torch.long)
                      for row, k in enumerate(selection.kept_vision)])
    return rows, cols


def keep_flags(selection: Selection, vision: torch.Tensor, attention: torch.Tensor, method: str) -> torch.Tensor:
    """[B, P] True on the slots a stage keeps: every valid non-vision slot and the selected vision slots."""
    keep = attention & ~vision
    rows, cols = selected_slots(selection, vision.device)
    if not bool(vision[rows, cols].all()):
        raise RuntimeError(f"method {method!r} selected a position that is not a vision token")
    keep[rows, cols] = True
    return keep


def left_padded_gather(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(index [B, W], valid [B, W], kept count per row) gathering each row's kept slots, in order, left-padded."""
    counts = keep.sum(1)
    width, length = int(counts.max()), keep.shape[1]
    # A stable sort on the keep flag puts each row's kept slots last, in order: a left-padded gather.
    index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - width:]
    valid = torch.arange(width, device=keep.device) >= (width - counts)[:, None]
    return index, valid, counts.tolist()


def stage_runners(config: PruningConfig, n_layers: int, build_method: Any,
                  capture_layer: Any) -> list[StageRunner]:
    """One runner per stage of `config`; `build_method(cfg)` makes a method, `capture_layer(i, method)` a capture."""
    configs = config.stage_configs()
    runners = []
    for index, stage in enumerate(configs):
        end = configs[index + 1].layer if index + 1 < len(configs) else n_layers
        method = build_method(stage)
        runners.append(StageRunner(index=index, start=stage.layer, end=end, config=stage, method=method,
                                   capture=capture_layer(stage.layer - 1, method)))
    return runners
