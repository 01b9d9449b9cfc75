"""Visual-token pruning on stock transformers VLMs: `apply_pruning`, the methods and their registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuner.config import PruningConfig, Stage, as_pruning_config
from tuner.config.workload import Workload
from tuner.models.families import adapter_for
from tuner.pruning.base import Needs, PruningMethod, ScoredMethod, Selection, SelectionContext
from tuner.pruning.hooks import PruningHandle, RequestStats
from tuner.pruning.preset_check import check_family, warn_on_mismatch, warn_on_workload
from tuner.pruning.registry import available_methods, get_method_class, register_method


def apply_pruning(model: torch.nn.Module, config: PruningConfig | Any, *,
                  vision_token_ids: Sequence[int] | None = None, workload: Workload | None = None) -> PruningHandle:
    """Attach pruning hooks to a loaded model and return the handle (a context manager; `.remove()`).

    `config` is a `PruningConfig` or anything holding one as `.config` (a preset). `vision_token_ids`
    overrides the ids read from the model config, and lets a plain decoder-only LM be pruned (benchmarks).
    `workload`: the batch, new tokens and objective this deployment serves; a preset tuned for another warns.
    """
    pruning_config = as_pruning_config(config)
    if pruning_config is not config and getattr(config, "provenance", None):
        check_family(config)
        warn_on_mismatch(model, config)
        if workload is not None:
            warn_on_workload(config, workload)
    return PruningHandle(model, pruning_config, adapter_for(model, vision_token_ids))


__all__ = ["Needs", "PruningConfig", "PruningHandle", "PruningMethod", "RequestStats", "ScoredMethod", "Selection",
           "SelectionContext", "Stage", "apply_pruning", "available_methods", "get_method_class", "register_method"]
