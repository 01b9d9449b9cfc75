"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles plus a newline token per row of features."""

from __future__ import annotations

from typing import Any

from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family
from tuner.models.families.llava import CLIP_L336, CLIP_L336_PROCESSOR

# Anyres grids ([height, width]) of the tiny model: a base crop plus two high-res crops per image.
_TINY_GRID_PINPOINTS = [[112, 224], [224, 112]]
# llava-v1.6 checkpoints: a 336 px base crop plus 2-4 tiles of 336 px.
_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@register_family
class LlavaNext(Family):
    """LLaVA-NeXT: base crop and high-res tiles, unpadded, with `image_newline` tokens, all under one id."""

    name = "llava_next"
    model_types = ("llava_next",)
    class_names = ("LlavaNextForConditionalGeneration",)
    vision_tokens = "the image placeholder id, once per tile feature and per row newline"
    reference_quota_rule = "llava_next"
    hub_id = "llava-hf/llava-v1.6-mistral-7b-hf"
    search_space = "llava_next.yaml"
    special = "anyres: 1-5 tiles, up to 2,880 tokens per image; newline tokens are vision tokens too"
    tiny_image_sizes = ((200, 120), (120, 180))

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
