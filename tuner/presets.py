"""Preset files: a `PruningConfig` with the metrics it was chosen on and where they were measured (YAML).

```yaml
schema_version: 1
config: {method: dart, layer: 2, keep_ratio: 0.25, n_image_pivots: 4, n_text_pivots: 4, ...}
metrics: {accuracy: 0.91, prefill_ms_median: 41.2, ...}      # optional
provenance: {model_id: ..., family: ..., torch: ..., ...}    # optional
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuner.config import PruningConfig

SCHEMA_VERSION = 1
_TOP_LEVEL_KEYS = {"schema_version", "config", "metrics", "provenance"}


class PresetError(ValueError):
    """A preset file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Preset:
    """A deployable pruning configuration and its evidence."""

    config: PruningConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "config": self.config.to_dict(),
                "metrics": dict(self.metrics), "provenance": dict(self.provenance)}


def save_preset(preset: Preset, path: str | Path) -> Path:
    """Write `preset` as YAML (keys in a stable order) and return the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(preset.to_dict(), sort_keys=False))
    return path


def config_from_dict(data: Any, where: str) -> PruningConfig:
    """A PruningConfig from plain data, with errors naming `where` and the bad key."""
    if not isinstance(data, dict):
        raise PresetError(f"{where}: 'config' must be a mapping of PruningConfig fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(PruningConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PresetError(f"{where}: unknown config key(s) {unknown}; known: {sorted(known)}")
    try:
        return PruningConfig(**data)
    except (ValueError, TypeError) as error:
        raise PresetError(f"{where}: invalid config: {error}") from error


def load_preset(path: str | Path) -> Preset:
    """Read and validate a preset file; every problem is a PresetError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PresetError(f"cannot read preset {str(path)!r}: {error.strerror or error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PresetError(f"preset {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise PresetError(f"preset {str(path)!r} must be a YAML mapping with a 'config' key")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PresetError(f"preset {str(path)!r}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise PresetError(f"preset {str(path)!r} has schema_version {version}, newer than this dart-tuner reads "
                          f"({SCHEMA_VERSION}); upgrade dart-tuner")
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise PresetError(f"preset {str(path)!r}: unknown top-level key(s) {unknown}; known: {sorted(_TOP_LEVEL_KEYS)}")
    if "config" not in data:
        raise PresetError(f"preset {str(path)!r} has no 'config'")
    for key in ("metrics", "provenance"):
        if not isinstance(data.get(key) or {}, dict):
            raise PresetError(f"preset {str(path)!r}: {key!r} must be a mapping")
    config = config_from_dict(data["config"], f"preset {str(path)!r}")
    return Preset(config=config, metrics=dict(data.get("metrics") or {}),
                  provenance=dict(data.get("provenance") or {}), schema_version=version)
