"""Loading a supported VLM once (hub id or local folder): model, processor, family and what it ran with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel, ProcessorMixin

from tuner.errors import DartTunerError
from tuner.models.attention import resolve_attn_implementation
from tuner.models.families import (
    FamilyAdapter,
    adapter_for,
    detect_family,
    family_for_model_type,
    supported_classes,
    supported_model_types,
)
from tuner.models.processors import load_processor

# Checkpoints shipped inside the package, named as `embedded:<name>`.
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS: dict[str, Path] = {"tiny-llava-shapes": Path(__file__).parents[1] / "tiny" / "checkpoint"}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(DartTunerError, ValueError):
    """A model that cannot be loaded or is not supported, with the reason in the message."""


@dataclass
class LoadedModel:
    """A loaded VLM with its processor and the facts a study records about it."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: str
    model_id: str
    revision: str | None
    dtype: torch.dtype
    device: torch.device
    attn_implementation: str

    @property
    def adapter(self) -> FamilyAdapter:
        return adapter_for(self.model)

    def provenance(self) -> dict[str, Any]:
        """JSON-able description of what was loaded and how (stored with studies and presets)."""
        return {"model_id": self.model_id, "revision": self.revision, "family": self.family,
                "dtype": str(self.dtype).removeprefix("torch."), "device": device_name(self.device),
                "attn_implementation": self.attn_implementation}


def device_name(device: torch.device) -> str:
    """Human-readable hardware name: the GPU model on CUDA, else 'cpu'."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; an unavailable CUDA device is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelLoadError(f"device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a CUDA device that supports it, else float32; names as in DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_embedded(name: str) -> Path:
    """Folder of a checkpoint shipped in the package (`embedded:tiny-llava-shapes`)."""
    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}; embedded: "
                             f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)}")
    folder = EMBEDDED_MODELS[key]
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"embedded model {name!r} is missing from this installation ({folder}); "
                             f"re-create it with `dart-tuner train-tiny --out {folder}`")
    return folder


def _load_config(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise ModelLoadError(f"model {model!r}: no such directory")
    try:
        return AutoConfig.from_pretrained(Path(model).expanduser() if looks_local else model, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "the folder has no readable config.json" if looks_local else (
            "not a local folder, and the Hugging Face Hub has no such model or cannot be reached")
        raise ModelLoadError(f"cannot load model {model!r}: {where} ({type(error).__name__}: {error})") from error


def load_model(model: str | Path, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", attn_implementation: str | None = "auto",
               revision: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a supported VLM and its processor for inference (eval mode, left padding).

    The family is checked on the config, before any weights are read, so an unsupported model fails in
    a second with the list of supported ones.
    """
    model_id = str(model)
    if model_id.startswith(EMBEDDED_PREFIX):
        model = resolve_embedded(model_id)
    config = _load_config(str(model), revision, trust_remote_code)
    model_type = getattr(config, "model_type", None)
    family = family_for_model_type(model_type)
    if family is None:  # checked before any weights are read
        raise ModelLoadError(f"model {model_id!r} is a {model_type!r} model, which dart-tuner does not support; "
                             f"supported model types: {', '.join(supported_model_types())} "
                             f"({', '.join(supported_classes())})")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        attn = resolve_attn_implementation(attn_implementation, torch_device, family.transformers_class())
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    path = Path(model).expanduser() if Path(model).expanduser().is_dir() else model_id
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn,
                                                             revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as error:  # missing, truncated or mismatched weight files
        first_line = next(iter(str(error).strip().splitlines()), "")
        raise ModelLoadError(f"cannot load the weights of model {model_id!r}: {type(error).__name__}: "
                             f"{first_line}") from error
    loaded.to(torch_device)
    loaded.eval()
    family = detect_family(loaded)
    processor = load_processor(path, family, revision=revision, trust_remote_code=trust_remote_code)
    return LoadedModel(model=loaded, processor=processor, family=family, model_id=model_id,
                       revision=revision or getattr(config, "_commit_hash", None), dtype=torch_dtype,
                       device=torch_device, attn_implementation=attn)
