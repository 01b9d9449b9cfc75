"""Model inputs for a batch of (question, images) pairs: prompts in the model's format, left-padded, on device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers import BatchFeature

from tuner.models.families import get_family
from tuner.models.loading import LoadedModel
from tuner.models.prompts import build_prompt


def as_images(visuals: Any, where: str) -> list[Image.Image]:
    """A task's visuals as RGB PIL images; video paths and other media are rejected by name."""
    if visuals is None:
        return []
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    images = []
    for item in items:
        if not isinstance(item, Image.Image):
            raise TypeError(f"{where}: dart-tuner evaluates image inputs, got a {type(item).__name__} visual "
                            f"({str(item)[:80]!r})")
        images.append(item.convert("RGB"))
    return images


def build_inputs(loaded: LoadedModel, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> BatchFeature:
    """Processor output for one prompt per text (its images first), left-padded and moved to the model."""
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
    prompts = [build_prompt(loaded.processor, loaded.family, text, len(row)) for text, row in zip(texts, images)]
    batch_images = get_family(loaded.family).processor_images(images) if any(images) else None
    inputs = loaded.processor(text=prompts, images=batch_images, return_tensors="pt", padding=True)
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs
