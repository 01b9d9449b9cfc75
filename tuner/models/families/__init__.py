"""The supported VLM families, one file each, registered by `config.model_type` and top-level class.

Adding a family is one new file here (a `Family` subclass decorated with `@register_family`, imported
below), its default search space `search_spaces/<name>.yaml` and a row in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tuner.models.families.base import Family, FamilyAdapter, PrunedPrefill, bind

_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family known by its name, model types and class names."""
    family = cls()
    for other in _FAMILIES.values():
        if other.name == family.name or set(other.model_types) & set(family.model_types):
            raise ValueError(f"family {family.name!r} clashes with the registered family {other.name!r}")
    _FAMILIES[family.name] = family
    return cls


def registered_families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def family_names() -> tuple[str, ...]:
    """Names of the registered families (what studies and presets store)."""
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as `name`, or a ValueError listing the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_FAMILIES)}") from None


def supported_model_types() -> tuple[str, ...]:
    """Every `config.model_type` some family accepts."""
    return tuple(t for family in _FAMILIES.values() for t in family.model_types)


def supported_classes() -> tuple[str, ...]:
    """Every top-level model class some family accepts."""
    return tuple(c for family in _FAMILIES.values() for c in family.class_names)


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints have this `config.model_type`, if any."""
    return next((f for f in _FAMILIES.values() if model_type in f.model_types), None)


def family_of(model: torch.nn.Module) -> Family:
    """The family of a loaded model (by its class or a base class), or a ValueError naming the supported ones."""
    for cls in type(model).__mro__:
        for family in _FAMILIES.values():
            if cls.__name__ in family.class_names:
                return family
    raise ValueError(
        f"unsupported model class {type(model).__name__}; supported: {', '.join(supported_classes())} "
        "(or any decoder-only LM with explicit vision_token_ids, e.g. for benchmarks)"
    )


def detect_family(model: torch.nn.Module) -> str:
    """Family name of a loaded model, or a ValueError naming its class and the supported ones."""
    return family_of(model).name


class _CustomFamily(Family):
    """A plain decoder-only LM pruned at given vision token ids (benchmarks); not registered."""

    name = "custom"
    model_types = ()
    class_names = ()


def adapter_for(model: torch.nn.Module, vision_token_ids: Sequence[int] | None = None) -> FamilyAdapter:
    """Adapter for a supported VLM; a plain decoder-only LM is accepted when `vision_token_ids` are given."""
    try:
        family = family_of(model)
    except ValueError:
        if vision_token_ids is None:
            raise
        family = _CustomFamily()
    return bind(family, model, vision_token_ids)


# The bundled families register themselves on import; the order is docs/models.md's.
from tuner.models.families import (  # noqa: E402, F401, I001
    llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, gemma3, internvl, idefics3,
    smolvlm,
)

__all__ = ["Family", "FamilyAdapter", "PrunedPrefill", "adapter_for", "detect_family", "family_names",
           "family_for_model_type", "family_of", "get_family", "register_family", "registered_families",
           "supported_classes", "supported_model_types"]
