"""The processor's own vision-token budget: the settings that decide how many vision tokens an image becomes
before any pruning (Qwen2/2.5/3-VL's `max_pixels` / `min_pixels`, LLaVA's `image_size`), applied to a loaded
model's processor for a while and undone after.

Names are the processor's own, so a chosen point ports to a serving engine's processor arguments unchanged (vLLM's
`--mm-processor-kwargs`). Each family declares its settings (`Family.processor_settings`) and applies them
(`Family.set_processor`); a setting the family lacks is one line naming it and the family's settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import ProcessorMixin

from tuner.config.pruning_config import PruningConfig, as_processor_settings
from tuner.models.families import get_family
from tuner.models.families.base import Family, ProcessorSettingError

if TYPE_CHECKING:
    from tuner.models.loading import LoadedModel

__all__ = ["ProcessorSettingError", "applied_settings", "apply_processor_settings", "check_processor_settings",
           "processor_settings", "without_loaded_values"]

_APPLIED = "_dart_tuner_processor_settings"  # on the model: the settings applied to it and its processor now


def check_processor_settings(family: Family, settings: Mapping[str, Any]) -> dict[str, int]:
    """`settings` checked against the family's: positive integers (`PruningConfig`'s own check), known names;
    sorted by name."""
    try:
        checked = as_processor_settings(settings)
    except ValueError as error:
        raise ProcessorSettingError(str(error)) from None
    for name in checked:
        if name not in family.processor_settings:
            allowed = ", ".join(family.processor_settings) or "none"
            raise ProcessorSettingError(f"processor.{name} is not a processor setting of family {family.name} "
                                        f"(its settings: {allowed})")
    return checked


def without_loaded_values(loaded: LoadedModel, config: PruningConfig) -> PruningConfig:
    """`config` without the processor settings that equal the processor's as loaded: the same inputs, so the same
    configuration as one that names none (one label, one duplicate check, one front at the default processor)."""
    as_loaded = get_family(loaded.family).loaded_processor_settings(loaded.processor)
    kept = {name: value for name, value in config.processor.items() if as_loaded.get(name) != value}
    return config if kept == config.processor else dataclasses.replace(config, processor=kept)


def applied_settings(model: torch.nn.Module) -> dict[str, int]:
    """The processor settings applied to `model` (and its processor) now; empty when none are."""
    return dict(getattr(model, _APPLIED, {}))


def apply_processor_settings(family: Family, processor: ProcessorMixin, model: torch.nn.Module,
                             settings: Mapping[str, Any]) -> Callable[[], None]:
    """Apply `settings` to `processor` (and `model`, where it must follow) and return the undo; the model remembers
    them (`applied_settings`) until the undo, so pruning can tell that its configuration's inputs are in place."""
    checked = check_processor_settings(family, settings)
    if not checked:
        return lambda: None
    applied = applied_settings(model)
    if applied == checked:  # applied by the caller already (an evaluation around its pruning): nothing to do
        return lambda: None
    if applied:
        now = ", ".join(f"{name}={value}" for name, value in applied.items())
        raise ProcessorSettingError(f"processor settings {now} are already applied to this model; undo them first")
    undo_family = family.set_processor(processor, model, checked)
    setattr(model, _APPLIED, checked)

    def undo() -> None:
        if hasattr(model, _APPLIED):
            delattr(model, _APPLIED)
            undo_family()
    return undo


@contextmanager
def processor_settings(loaded: LoadedModel, settings: Mapping[str, Any] | None) -> Iterator[None]:
    """Inputs built inside use the processor with `settings` (None or empty: as loaded); undone on exit, also on
    an error. The model follows where it must (LLaVA interpolates its vision tower's position embeddings)."""
    undo = apply_processor_settings(get_family(loaded.family), loaded.processor, loaded.model, settings or {})
    try:
        yield
    finally:
        undo()
