"""Choosing the attention implementation: flash-attention 2 when it can run, else sdpa; eager on request."""

from __future__ import annotations

import torch
from transformers.utils import is_flash_attn_2_available

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn_implementation(requested: str | None = "auto", device: str | torch.device | None = None,
                                model_class: type | None = None) -> str:
    """The implementation to load a model with; an explicit flash_attention_2 that cannot run is an error.

    `model_class` is the class to be loaded: 'auto' never picks flash-attention for a class transformers refuses
    it for (`_supports_flash_attn = False`, e.g. Gemma 3, whose image tokens attend both ways).

    Checked here rather than left to transformers, whose ImportError comes late and leaves the failed
    choice written into the config object it was given.
    """
    requested = requested or "auto"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    flash_usable = on_cuda and is_flash_attn_2_available()
    class_allows_flash = getattr(model_class, "_supports_flash_attn", True)
    if requested == "auto":
        return "flash_attention_2" if flash_usable and class_allows_flash else "sdpa"
    if requested == "flash_attention_2" and not class_allows_flash:
        raise ValueError(f"attn_implementation='flash_attention_2' was requested but {model_class.__name__} does "
                         "not support it in transformers; use 'sdpa' (default) or 'eager'")
    if requested == "flash_attention_2" and not flash_usable:
        reason = "the flash-attn package is not installed or not usable" if on_cuda else "it needs a CUDA device"
        raise ValueError(f"attn_implementation='flash_attention_2' was requested but {reason}; install "
                         "`dart-tuner[gpu]` on a CUDA machine, or use 'sdpa' (default) or 'eager'")
    return requested
