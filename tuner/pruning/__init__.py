"""Visual-token pruning on stock transformers VLMs: `apply_pruning`, the methods and their registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import ProcessorMixin

from tuner.config import PruningConfig, Stage, as_pruning_config
from tuner.config.workload import Workload
from tuner.models.families import adapter_for
from tuner.models.families.base import Family
from tuner.models.processor_budget import applied_settings, apply_processor_settings
from tuner.pruning.base import Needs, PruningMethod, ScoredMethod, Selection, SelectionContext
from tuner.pruning.hooks import PruningHandle, RequestStats
from tuner.pruning.preset_check import check_family, warn_on_mismatch, warn_on_workload
from tuner.pruning.registry import available_methods, get_method_class, register_method


def apply_pruning(model: torch.nn.Module, config: PruningConfig | Any, *, processor: ProcessorMixin | None = None,
                  vision_token_ids: Sequence[int] | None = None, workload: Workload | None = None) -> PruningHandle:
    """Attach pruning hooks to a loaded model and return the handle (a context manager; `.remove()`).

    `config` is a `PruningConfig` or anything holding one as `.config` (a preset). A configuration with processor
    settings (`config.processor`, such as `image_size` or `max_pixels`) needs the model's `processor`: they are
    applied to it, so images become the vision tokens the configuration was tuned on, and undone with the hooks.
    `vision_token_ids` overrides the ids read from the model config, and lets a plain decoder-only LM be pruned
    (benchmarks). `workload`: the batch, new tokens and objective this deployment serves; a preset tuned for
    another warns.
    """
    pruning_config = as_pruning_config(config)
    if pruning_config is not config and getattr(config, "provenance", None):
        check_family(config)
        warn_on_mismatch(model, config)
        if workload is not None:
            warn_on_workload(config, workload)
    adapter = adapter_for(model, vision_token_ids)
    undo = _apply_processor_settings(model, pruning_config, processor, adapter.spec)
    try:
        handle = PruningHandle(model, pruning_config, adapter)
    except BaseException:
        undo()
        raise
    handle.on_remove(undo)
    return handle


def _apply_processor_settings(model: torch.nn.Module, config: PruningConfig, processor: ProcessorMixin | None,
                              family: Family) -> Callable[[], None]:
    """Apply the configuration's processor settings to `processor` and return the undo; a configuration that has
    some and no processor to take them is one line (unless they are applied to this model already)."""
    wanted = config.processor
    if not wanted or applied_settings(model) == wanted:
        return lambda: None
    if processor is None:
        settings = ", ".join(f"{name}={value}" for name, value in wanted.items())
        raise ValueError(f"the configuration sets processor settings ({settings}): pass the model's processor, "
                         "apply_pruning(model, config, processor=processor), so images become the vision tokens "
                         "it was tuned on")
    return apply_processor_settings(family, processor, model, wanted)


__all__ = ["Needs", "PruningConfig", "PruningHandle", "PruningMethod", "RequestStats", "ScoredMethod", "Selection",
           "SelectionContext", "Stage", "apply_pruning", "available_methods", "get_method_class", "register_method"]
