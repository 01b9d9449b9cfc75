"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with a windowed-attention vision tower."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
from transformers.vision_utils import get_vision_window_index

from tuner.models.families import register_family, tiny
from tuner.models.families.qwen2_vl import (
    QWEN_7B_TEXT,
    QWEN_IDS,
    TINY_MERGE,
    TINY_PATCH,
    ImageOnlyProcessorMixin,
    QwenFamily,
)


class ImageOnlyQwen2_5_VLProcessor(ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only (see `ImageOnlyProcessorMixin`)."""


@register_family
class Qwen2_5_VL(QwenFamily):
    """Qwen2.5-VL."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    image_only_processor = ImageOnlyQwen2_5_VLProcessor
    vision_saliency_query = "mean"  # no CLS token; the last block attends over the whole image
    hub_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    search_space = "qwen2_5_vl.yaml"

    def vision_token_order(self, config: Any, grid_thw: torch.Tensor | None) -> torch.Tensor:
        """The blocks see patch groups in window order (`get_vision_window_index`); the merger's output is put back
        with its inverse permutation, which is this order."""
        if grid_thw is None:
            raise RuntimeError("the vision model was called without grid_thw, which its window order needs")
        vision = config.vision_config
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=vision.spatial_merge_size,
                                                  window_size=vision.window_size, patch_size=vision.patch_size)
        return torch.argsort(window_index)

    def tiny_vision_config(self) -> dict[str, Any]:
        """A windowed block and a full-attention block (window 112 px = 4x4 tokens)."""
        return {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                "out_hidden_size": tiny.TEXT_HIDDEN, "patch_size": TINY_PATCH, "spatial_merge_size": TINY_MERGE,
                "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1]}

    def published_config(self) -> Qwen2_5_VLConfig:
        """Qwen/Qwen2.5-VL-7B-Instruct: 32 SwiGLU ViT blocks, windowed except blocks 7, 15, 23, 31."""
        return Qwen2_5_VLConfig(
            text_config={**QWEN_7B_TEXT, "max_position_embeddings": 128000},
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584, "hidden_act": "silu", "patch_size": 14, "spatial_merge_size": 2,
                           "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                           "tokens_per_second": 2},
            **QWEN_IDS,
        )
