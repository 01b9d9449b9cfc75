"""Loading supported VLMs and the per-family facts pruning needs."""

from tuner.models.families import SUPPORTED_CLASSES, FamilyAdapter, adapter_for, detect_family
from tuner.models.loading import LoadedModel, ModelLoadError, load_model

__all__ = ["SUPPORTED_CLASSES", "FamilyAdapter", "LoadedModel", "ModelLoadError", "adapter_for", "detect_family",
           "load_model"]
