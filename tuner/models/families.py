"""Model families: the little that differs between supported VLMs (where the decoder is, which ids are vision)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Top-level class name -> family. Every family here passes the same property tests (tests/test_hooks.py).
SUPPORTED_CLASSES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
# Families whose top-level forward derives (M-RoPE) positions from the attention mask when given none.
_MASK_AWARE_POSITIONS = frozenset({"qwen2_vl", "qwen2_5_vl"})
_VISION_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass(frozen=True)
class FamilyAdapter:
    """Where pruning hooks go in one loaded model, and how to spot its vision tokens."""

    family: str
    text_model: torch.nn.Module  # the decoder stack (LlamaModel, Qwen2VLTextModel, ...)
    vision_token_ids: tuple[int, ...]

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.text_model.layers

    @property
    def positions_ignore_padding(self) -> bool:
        """Whether a call without `position_ids` numbers positions 0..N-1 straight across left padding."""
        return self.family not in _MASK_AWARE_POSITIONS

    def vision_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Where each row's vision tokens are: ids among `vision_token_ids`, padding excluded."""
        return torch.isin(input_ids, _ids_on(self.vision_token_ids, input_ids.device)) & attention_mask.bool()

    @property
    def layer_types(self) -> list[str]:
        """Attention type per decoder layer; configs without `layer_types` are all full attention."""
        types = getattr(self.text_model.config, "layer_types", None)
        return list(types) if types else ["full_attention"] * len(self.layers)


@functools.lru_cache(maxsize=64)
def _ids_on(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The token ids as a tensor on `device`, made once: the hooks ask on every prefill."""
    return torch.tensor(ids, device=device)


def detect_family(model: torch.nn.Module) -> str:
    """Family name of a loaded model, or a ValueError naming its class and the supported ones."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return SUPPORTED_CLASSES[cls.__name__]
    raise ValueError(
        f"unsupported model class {type(model).__name__}; supported: {', '.join(SUPPORTED_CLASSES)} "
        "(or any decoder-only LM with explicit vision_token_ids, e.g. for benchmarks)"
    )


def adapter_for(model: torch.nn.Module, vision_token_ids: Sequence[int] | None = None) -> FamilyAdapter:
    """Adapter for a supported VLM; a plain decoder-only LM is accepted when `vision_token_ids` are given."""
    if vision_token_ids is not None:
        ids = tuple(int(i) for i in vision_token_ids)
        if not ids:
            raise ValueError("vision_token_ids must name at least one token id")
        try:
            family = detect_family(model)
        except ValueError:
            family = "custom"
    else:
        family = detect_family(model)
        ids = tuple(dict.fromkeys(
            value for name in _VISION_ID_FIELDS
            if isinstance(value := getattr(model.config, name, None), int)
        ))
        if not ids:
            raise ValueError(f"{type(model).__name__} config defines none of {_VISION_ID_FIELDS}")
    text_model = model.get_decoder() if hasattr(model, "get_decoder") else None
    if text_model is None or not isinstance(getattr(text_model, "layers", None), torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.get_decoder().layers)")
    if not hasattr(text_model, "norm"):
        raise ValueError(f"{type(text_model).__name__} has no final norm (`.norm`), which DART needs")
    return FamilyAdapter(family=family, text_model=text_model, vision_token_ids=ids)
