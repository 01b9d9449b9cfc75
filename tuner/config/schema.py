"""Reading stored configurations of every schema version: presets, trials' `config` attributes, model args.

Schema 1 (presets without `schema_version` 2, trials without a `config_schema` attribute) kept DART's pivot
counts and order as top-level fields shared by every stage; schema 2 keeps them in DART's own options, like every
method's options. `upgrade_config_data` turns schema-1 data into schema 2, so old presets and studies still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuner.config.pruning_config import PruningConfig

CONFIG_SCHEMA = 2  # the plain-data form `PruningConfig.to_dict` writes
CONFIG_SCHEMA_ATTR = "config_schema"  # trial user attribute: the schema of its `config` attribute (absent: 1)
LEGACY_METHOD = "dart"  # the method the schema-1 top-level fields belonged to
LEGACY_FIELDS = ("n_image_pivots", "n_text_pivots", "pivot_order")  # schema 1's top-level DART fields
LEGACY_PARAMS = {"n_image_pivots": "dart.n_image_pivots", "n_text_pivots": "dart.n_text_pivots"}  # Optuna names


def upgrade_config_data(data: Mapping[str, Any], schema: int) -> dict[str, Any]:
    """`data` (a stored configuration of schema `schema`) in the current schema.

    Schema 1's top-level pivot fields move into the options of every stage that runs DART with options of its own:
    the first stage when it is DART, and each later stage that names DART (a stage without a method inherits
    the first stage's options). Other methods ignored those fields, so they are dropped there.
    """
    if schema not in (1, CONFIG_SCHEMA):
        raise ValueError(f"unknown configuration schema {schema!r}; this dart-tuner reads 1 and {CONFIG_SCHEMA}")
    data = dict(data)
    if schema == CONFIG_SCHEMA:
        return data
    legacy = {key: data.pop(key) for key in LEGACY_FIELDS if key in data}
    if not legacy:
        return data
    if data.get("method", LEGACY_METHOD) == LEGACY_METHOD:
        data["options"] = {**legacy, **(data.get("options") or {})}
    if isinstance(data.get("stages"), list):
        data["stages"] = [{**stage, "options": {**legacy, **(stage.get("options") or {})}}
                          if isinstance(stage, Mapping) and stage.get("method") == LEGACY_METHOD else stage
                          for stage in data["stages"]]
    return data


def config_from_data(data: Mapping[str, Any], schema: int = CONFIG_SCHEMA) -> PruningConfig:
    """The PruningConfig stored as `data` in schema `schema` (ValueError / TypeError when it is not valid)."""
    return PruningConfig(**upgrade_config_data(data, schema))


def legacy_param(name: str) -> str:
    """An Optuna parameter name of a schema-1 study in today's '<method>.<option>' form (others unchanged)."""
    return LEGACY_PARAMS.get(name, name)


def config_attrs(config: PruningConfig | None) -> dict[str, Any]:
    """What a trial stores about its configuration: `config` (plain data, None for the baseline) and its schema."""
    return {"config": config.to_dict() if config is not None else None, CONFIG_SCHEMA_ATTR: CONFIG_SCHEMA}
