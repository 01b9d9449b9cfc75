"""Loading a VLM's processor, with the family's image-only fallback where torchvision is missing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, ProcessorMixin

from tuner.models.families import get_family

logger = logging.getLogger(__name__)


def _needs_video_dependency(error: Exception) -> bool:
    """Whether loading failed on what only video needs: torchvision, or num2words (SmolVLM's frame prompts)."""
    return any(name in str(error).lower() for name in ("torchvision", "num2words"))


def load_processor(path: str | Path, family: str, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> ProcessorMixin:
    """`AutoProcessor` for `path`, left-padding, with the family's image-only fallback when torchvision is missing."""
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    fallback = get_family(family).image_only_processor
    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    except (ImportError, ValueError) as error:  # a missing video processor class, or none mapped without torchvision
        if fallback is None or not _needs_video_dependency(error):
            raise
        logger.info("torchvision or num2words is missing: loading %s's processor for images only", path)
        processor = fallback.from_pretrained(path, **kwargs)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: AutoProcessor returned {type(processor).__name__}, which has no tokenizer and "
                         "image processor; the checkpoint needs a processor (preprocessor_config.json)")
    tokenizer.padding_side = "left"  # batched generation appends after the last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
