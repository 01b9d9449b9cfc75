"""Preset files: a `PruningConfig` with the metrics it was chosen on and where they were measured (YAML).

```yaml
schema_version: 2
config: {method: dart, layer: 2, keep_ratio: 0.25, options: {n_image_pivots: 4, n_text_pivots: 4, ...}, ...}
metrics: {accuracy: 0.91, prefill_ms_median: 41.2, ...}      # optional
provenance: {model_id: ..., family: ..., torch: ..., ...}    # optional
```

`schema_version` is the schema of `config` (`tuner.config.schema`): version 1 presets, with DART's pivots as
top-level config keys, still load.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuner.config.pruning_config import PruningConfig
from tuner.config.schema import CONFIG_SCHEMA, LEGACY_FIELDS, config_from_data
from tuner.config.yaml_files import read_yaml
from tuner.errors import DartTunerError

SCHEMA_VERSION = CONFIG_SCHEMA  # written; every version from 1 up to it is read
_TOP_LEVEL_KEYS = {"schema_version", "config", "metrics", "provenance"}


class PresetError(DartTunerError, ValueError):
    """A preset file that cannot be used; the message names the file and what is wrong."""


class PresetMismatchWarning(UserWarning):
    """A preset applied on a stack that differs from the one it was measured on."""


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


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: preset files never contain aliases, so readers may refuse them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases, whose nested expansion ("billion laughs") can take gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a preset",
                                              event.start_mark)
        return super().compose_node(parent, index)


def preset_to_yaml(preset: Preset) -> str:
    """The text of a preset file (keys in a stable order): what `save_preset` writes."""
    return yaml.dump(preset.to_dict(), Dumper=_PlainDumper, sort_keys=False)


def save_preset(preset: Preset, path: str | Path) -> Path:
    """Write `preset` as YAML and return the path. The file is replaced atomically: a stop or a full disk midway
    leaves the previous file intact, never a truncated one. It keeps the permissions of the file it replaces; a
    new file gets those the umask gives (the temporary file's private 0600 is not carried over). Failures are
    PresetErrors naming the path."""
    path = Path(path)
    text = preset_to_yaml(preset)
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(descriptor, _mode_for(path))
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise PresetError(f"cannot write preset {str(path)!r}: {error.strerror or error}") from None
    return path


def _mode_for(path: Path) -> int:
    """The permission bits `path` should have: those of the file there now, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def config_from_dict(data: Any, where: str, schema: int = SCHEMA_VERSION) -> PruningConfig:
    """A PruningConfig from plain data of schema `schema`, with errors naming `where` and the bad key."""
    if not isinstance(data, dict):
        raise PresetError(f"{where}: 'config' must be a mapping of PruningConfig fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(PruningConfig)} | (set(LEGACY_FIELDS) if schema == 1 else set())
    unknown = sorted(set(data) - known)
    if unknown:
        hint = (f" (schema {schema}: {', '.join(k for k in unknown if k in LEGACY_FIELDS)} belong in "
                f"options)" if set(unknown) & set(LEGACY_FIELDS) else "")
        raise PresetError(f"{where}: unknown config key(s) {unknown}; known: {sorted(known)}{hint}")
    try:
        return config_from_data(data, schema)
    except (ValueError, TypeError) as error:
        raise PresetError(f"{where}: invalid config: {error}") from error


def load_preset(path: str | Path) -> Preset:
    """Read and validate a preset file; every problem is a PresetError naming the file."""
    path = Path(path)
    data = read_yaml(path, kind="preset", error=PresetError, loader=_NoAliasLoader)
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
    config = config_from_dict(data["config"], f"preset {str(path)!r}", version)
    return Preset(config=config, metrics=dict(data.get("metrics") or {}),
                  provenance=dict(data.get("provenance") or {}))  # read in any version, it is now the current one
