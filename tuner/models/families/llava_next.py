"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles plus a newline token per row of features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family
from tuner.models.families.grids import ImageGrids, Layout, place_layouts
from tuner.models.families.llava import CLIP_L336, CLIP_L336_PROCESSOR

# Anyres grids ([height, width]) of the tiny model: a base crop plus two high-res crops per image.
_TINY_GRID_PINPOINTS = [[112, 224], [224, 112]]
# llava-v1.6 checkpoints: a 336 px base crop plus 2-4 tiles of 336 px.
_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def anyres_layouts(config: Any, image_sizes: Sequence[Sequence[int]], max_crops: int | None = None,
                   patched: Sequence[bool] | None = None) -> list[Layout]:
    """Each image's token layout as the model's `pack_image_features` builds it, from its (height, width).

    A side x side base crop, then the high-res tiles' features unpadded to the image's aspect ratio (and, past
    `max_crops` crops' worth, downsampled as OneVision's `anyres_max_N` does), a newline ending each row. An
    image that is not `patched` (OneVision, several images in a prompt) is its base crop and one newline.
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    layouts = []
    for index, size in enumerate(image_sizes):
        if patched is not None and not patched[index]:
            layouts.append(Layout.with_newlines(side, 1, 0))
            continue
        tiles_h, tiles_w = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, vision.image_size)
        height, width = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), list(size)).shape[1:]
        if max_crops is not None:
            ratio = math.sqrt(height * width / (max_crops * side ** 2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
        layouts.append(Layout.with_newlines(side, height, width))
    return layouts


@register_family
class LlavaNext(Family):
    """LLaVA-NeXT: base crop and high-res tiles, unpadded, with `image_newline` tokens, all under one id."""

    name = "llava_next"
    model_types = ("llava_next",)
    class_names = ("LlavaNextForConditionalGeneration",)
    reference_quota_rule = "llava_next"
    hub_id = "llava-hf/llava-v1.6-mistral-7b-hf"
    search_space = "llava_next.yaml"
    tiny_image_sizes = ((200, 120), (120, 180))

    def image_grids(self, config: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
                    vision: torch.Tensor) -> list[ImageGrids]:
        """Per image (`image_sizes`): the base crop's grid and the unpadded high-res grid; newlines are leftover."""
        sizes = kwargs.get("image_sizes")
        placed = None if sizes is None else place_layouts(vision, anyres_layouts(config, sizes.tolist()))
        return placed if placed is not None else super().image_grids(config, kwargs, input_ids, vision)

    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """Base crop + two high-res crops of 112 px, unpadded, with an image_newline per row."""
        config = LlavaNextConfig(
            vision_config=tiny.clip_vision_config(), text_config=tiny.llama_text_config(tokenizer, layers),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=_TINY_GRID_PINPOINTS,
            vision_feature_select_strategy="default", vision_feature_layer=-2,
        )
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": tiny.CLIP_IMAGE_SIZE},
            crop_size={"height": tiny.CLIP_IMAGE_SIZE, "width": tiny.CLIP_IMAGE_SIZE},
            image_grid_pinpoints=_TINY_GRID_PINPOINTS,
        )
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       **tiny.llava_processor_kwargs())
        return LlavaNextForConditionalGeneration(config), processor

    def published_config(self) -> LlavaNextConfig:
        """llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct v0.2 behind CLIP ViT-L/14-336."""
        return LlavaNextConfig(
            text_config={"model_type": "mistral", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                         "sliding_window": None},
            vision_config=CLIP_L336, image_token_index=32000, image_grid_pinpoints=_GRID_PINPOINTS,
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
            use_image_newline_parameter=True, tie_word_embeddings=False,
        )

    def published_processor(self, tokenizer: Any) -> LlavaNextProcessor:
        """336 px base crop and anyres tiles over the published pinpoints, padded."""
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=_GRID_PINPOINTS, do_pad=True,
        )
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **CLIP_L336_PROCESSOR)
