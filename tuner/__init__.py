"""dart-tuner: find and apply the best visual-token pruning configuration for a multimodal LLM.

The public names load on first use (PEP 562), so `import tuner` and the `dart-tuner` command start without
importing torch and transformers; a command imports what it needs when it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.config import PruningConfig, Stage
    from tuner.config.preset import Preset, load_preset, save_preset
    from tuner.pruning import PruningHandle, RequestStats, apply_pruning, available_methods

__version__ = "0.1.0"
_HOMES = {"PruningConfig": "tuner.config", "Stage": "tuner.config", "Preset": "tuner.config.preset",
          "load_preset": "tuner.config.preset", "save_preset": "tuner.config.preset", "PruningHandle": "tuner.pruning",
          "RequestStats": "tuner.pruning", "apply_pruning": "tuner.pruning", "available_methods": "tuner.pruning"}
__all__ = ["Preset", "PruningConfig", "PruningHandle", "RequestStats", "Stage", "__version__",
           "apply_pruning", "available_methods", "load_preset", "save_preset"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
