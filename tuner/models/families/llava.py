"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop, 576 image tokens at 336 px, Llama/Vicuna decoder."""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family


@register_family
class Llava(Family):
    """LLaVA-1.5: the image placeholder repeated once per CLIP patch, plain causal masks, 1-D RoPE."""

    name = "llava"
    model_types = ("llava",)
    class_names = ("LlavaForConditionalGeneration",)
    reference_quota_rule = "llava15"
    hub_id = "llava-hf/llava-1.5-7b-hf"
    search_space = "llava15.yaml"
    special = "the reference DART setting: 576 tokens per image, K = 2"

    def tiny(self, tokenizer: Any, layers: int, text_config: Any = None) -> tuple[PreTrainedModel, ProcessorMixin]:
        """One 112 px crop -> 8x8 image tokens, over a Llama text model unless given another."""
        config = LlavaConfig(
            vision_config=tiny.clip_vision_config(),
            text_config=text_config or tiny.llama_text_config(tokenizer, layers),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(tiny.CLIP_IMAGE_SIZE // tiny.CLIP_PATCH) ** 2,
            vision_feature_select_strategy="default", vision_feature_layer=-2,
        )
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": tiny.CLIP_IMAGE_SIZE},
            crop_size={"height": tiny.CLIP_IMAGE_SIZE, "width": tiny.CLIP_IMAGE_SIZE},
        )
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   **tiny.llava_processor_kwargs())
        return LlavaForConditionalGeneration(config), processor
