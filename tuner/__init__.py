"""dart-tuner: find and apply the best visual-token pruning configuration for a multimodal LLM."""

from tuner.config import PruningConfig
from tuner.presets import Preset, load_preset, save_preset
from tuner.pruning import PruningHandle, RequestStats, apply_pruning, available_methods

__version__ = "0.1.0"
__all__ = ["Preset", "PruningConfig", "PruningHandle", "RequestStats", "__version__", "apply_pruning",
           "available_methods", "load_preset", "save_preset"]
