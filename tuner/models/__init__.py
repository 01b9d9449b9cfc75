"""Loading supported VLMs and the per-family facts pruning needs."""

from tuner.models.families import FamilyAdapter, adapter_for, detect_family, get_family, registered_families
from tuner.models.loading import LoadedModel, ModelLoadError, load_model

__all__ = ["FamilyAdapter", "LoadedModel", "ModelLoadError", "adapter_for", "detect_family", "get_family",
           "load_model", "registered_families"]
