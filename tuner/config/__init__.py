"""The torch-free vocabulary: `PruningConfig` and its stages, method options, the preset file format.

Everything here imports neither torch nor the pruning package, so a search space, a preset or a stored trial can
be read and checked on any machine.
"""

from tuner.config.pruning_config import (
    STAGE_KEYS,
    PruningConfig,
    Stage,
    as_pruning_config,
    check_layer,
    check_layers,
    methods_text,
    options_text,
    parse_schedule,
    processor_text,
    schedule_text,
    stack,
)

__all__ = ["STAGE_KEYS", "PruningConfig", "Stage", "as_pruning_config", "check_layer", "check_layers",
           "methods_text", "options_text", "parse_schedule", "processor_text", "schedule_text", "stack"]
