"""The processor's own vision-token budget: the settings that decide how many vision tokens an image becomes
before any pruning (Qwen2/2.5/3-VL's `max_pixels` / `min_pixels`, LLaVA's `image_size`), applied to a loaded
model's processor for a while and undone after.

Names are the processor's own, so a chosen point ports to a serving engine's processor arguments unchanged (vLLM's
`--mm-processor-kwargs`). Each family declares its settings (`Family.processor_settings`) and applies them
(`Family.set_processor`); a setting the family lacks is one line naming it and the family's settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tuner.config.pruning_config import as_processor_settings
from tuner.models.families import get_family
from tuner.models.families.base import Family, ProcessorSettingError
from tuner.models.loading import LoadedModel

__all__ = ["ProcessorSettingError", "check_processor_settings", "processor_settings"]


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


@contextmanager
def processor_settings(loaded: LoadedModel, settings: Mapping[str, Any] | None) -> Iterator[None]:
    """Inputs built inside use the processor with `settings` (None or empty: as loaded); undone on exit, also on
    an error. The model follows where it must (LLaVA interpolates its vision tower's position embeddings)."""
    family = get_family(loaded.family)
    checked = check_processor_settings(family, settings or {})
    if not checked:
        yield
        return
    undo = family.set_processor(loaded.processor, loaded.model, checked)
    try:
        yield
    finally:
        undo()
