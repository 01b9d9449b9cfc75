"""Checks a preset against the model it is applied to: an unknown family refuses, any other difference warns.

The preset file format itself is torch-free (`tuner.config.preset`); these checks need the loaded model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tuner.config.environment import environment
from tuner.config.preset import Preset, PresetError, PresetMismatchWarning
from tuner.config.workload import Workload, workload_warning
from tuner.models.families import detect_family, family_names
from tuner.models.loading import EMBEDDED_MODELS, device_name


def check_family(preset: Preset) -> None:
    """A PresetError when the preset was made for a model family this dart-tuner does not know."""
    family = preset.provenance.get("family")
    if family is not None and family not in family_names():
        where = preset.provenance.get("study")
        raise PresetError(f"preset{f' from study {where!r}' if where else ''} was made for model family "
                          f"{family!r}, which this dart-tuner does not know (known: "
                          f"{', '.join(sorted(family_names()))})")


def _current_versions() -> dict[str, str | None]:
    return environment()


def _model_identity(model_id: str | None) -> str | None:
    """Embedded names resolve to their folder, so a preset made on `embedded:x` matches the loaded folder."""
    if model_id and model_id.startswith("embedded:"):
        folder = EMBEDDED_MODELS.get(model_id.removeprefix("embedded:"))
        return str(folder.resolve()) if folder else model_id
    if model_id and Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser().resolve())
    return model_id


def preset_differences(model: torch.nn.Module, preset: Preset) -> list[str]:
    """One line per way the loaded model and this environment differ from the preset's provenance."""
    stored = preset.provenance
    if not stored:
        return []
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    current = {
        "model_id": _model_identity(getattr(config, "_name_or_path", None)),
        "family": detect_family(model) if config is not None else None,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        "device": device_name(parameter.device) if parameter is not None else None,
    }
    lines = []
    for key, value in current.items():
        expected = _model_identity(stored.get(key)) if key == "model_id" else stored.get(key)
        if expected is not None and value is not None and expected != value:
            lines.append(f"{key}: preset {stored.get(key)!r}, here {value!r}")
    versions = _current_versions()
    for key, expected in (stored.get("versions") or {}).items():
        if expected is not None and versions.get(key) is not None and versions.get(key) != expected:
            lines.append(f"{key} version: preset {expected}, here {versions.get(key)}")
    return lines


def warn_on_mismatch(model: torch.nn.Module, preset: Preset) -> list[str]:
    """Warn once, naming every difference, when a preset is applied off its measured stack; returns them."""
    lines = preset_differences(model, preset)
    if lines:
        where = f"study {preset.provenance.get('study')!r} trial {preset.provenance.get('trial')}"
        warnings.warn(f"preset from {where} was measured on a different stack; its accuracy and speed-up may not "
                      "hold here:\n  " + "\n  ".join(lines), PresetMismatchWarning, stacklevel=3)
    return lines


def warn_on_workload(preset: Preset, workload: Workload) -> str | None:
    """Warn, in one line, when a preset is used at another workload (batch, new tokens, objective) than it was
    tuned for; returns the warning (None when it matches or the preset does not record one)."""
    message = workload_warning(preset.provenance, workload)
    if message:
        warnings.warn(message, PresetMismatchWarning, stacklevel=3)
    return message
