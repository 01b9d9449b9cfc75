"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP anyres tiles with newlines, Qwen2 decoder.

As LLaVA-NeXT: a base crop, then the high-res tiles unpadded to the image's aspect ratio with an `image_newline`
after each row of features, all under the one `<image>` id. OneVision differs in its SigLIP tower (384 px, 729
tokens per crop, no CLS to drop), a 6x6 grid of pinpoints, and `anyres_max_9`: when the unpadded tiles hold more
than 9 crops' worth of features they are bilinearly downsampled first, so the count is capped near 9 x 729.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Config,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family, chatml_user_turn
from tuner.models.families.grids import ImageGrids, grids_from_runs, merge_grids, place_layouts
from tuner.models.families.llava_next import anyres_layouts
from tuner.models.families.qwen2_vl import ImageOnlyProcessorMixin

# Tiny crops: 56 px, patch 14 -> 4x4 = 16 features per crop; up to 2x2 tiles, downsampled past 2 crops' worth.
TINY_CROP, TINY_PATCH = 56, 14
TINY_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
TINY_ASPECT_RATIO = "anyres_max_2"
# The checkpoints' pinpoints: every (h, w) in {384, 768, ..., 2304}^2.
PUBLISHED_GRID_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# The processor maps a token missing from the vocabulary to `<unk>`.
IMAGE_TOKENS = ("<image>", "<video>")


class ImageOnlyLlavaOnevisionProcessor(ImageOnlyProcessorMixin, LlavaOnevisionProcessor):
    """LLaVA-OneVision processor for images only (its video processor needs torchvision).

    Its settings are named in the signature: `from_pretrained` passes on, and `to_dict` saves, only those.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, image_token=image_token,
                         video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


@register_family
class LlavaOnevision(Family):
    """LLaVA-OneVision: base crop + unpadded anyres tiles (downsampled past `anyres_max_9`) + row newlines."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    image_only_processor = ImageOnlyLlavaOnevisionProcessor
    hub_id = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    search_space = "llava_onevision.yaml"
    # Row 0: a wide image -> 1x2 tiles (unpadded 4x6 + 4 newlines); row 1: square -> 2x2 tiles, downsampled.
    tiny_image_sizes = ((168, 100), (112, 112))

    def fallback_prompt(self, text: str, n_images: int) -> str:
        """The checkpoints' ChatML user turn, one `<image>` line per image."""
        return chatml_user_turn(f"{self.image_placeholder}\n" * n_images + text)

    def image_grids(self, config: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
                    vision: torch.Tensor) -> list[ImageGrids]:
        """LLaVA-NeXT's layout per image (`image_sizes`), downsampled past `anyres_max_N`; an image that shares its
        prompt with others (`batch_num_images` > 1) is its base crop and a newline. Video tokens are runs."""
        sizes = kwargs.get("image_sizes")
        images = vision & (input_ids == config.image_token_index)
        placed = None
        if sizes is not None:
            aspect = kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio
            max_crops = int(aspect.removeprefix("anyres_max_")) if aspect.startswith("anyres_max_") else None
            counts = kwargs.get("batch_num_images")
            patched = None if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
            placed = place_layouts(images, anyres_layouts(config, sizes.tolist(), max_crops, patched))
        if placed is None:
            return super().image_grids(config, kwargs, input_ids, vision)
        return merge_grids([placed, grids_from_runs(vision & ~images)])

    # Tiny test model --------------------------------------------------------------------------------
    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """One-block SigLIP on 56 px crops (16 features each), up to 2x2 tiles capped at 2 crops' worth."""
        tiny.add_tokens(tokenizer, IMAGE_TOKENS)
        config = LlavaOnevisionConfig(
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": TINY_CROP,
                           "patch_size": TINY_PATCH, "vision_use_head": False},
            text_config=Qwen2Config(**tiny.text_sizes(tokenizer, layers)),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=TINY_GRID_PINPOINTS, vision_aspect_ratio=TINY_ASPECT_RATIO,
            vision_feature_select_strategy="full", vision_feature_layer=-1,
        )
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TINY_CROP, "width": TINY_CROP}, image_grid_pinpoints=TINY_GRID_PINPOINTS,
            image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        processor = ImageOnlyLlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(TINY_CROP // TINY_PATCH) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio=TINY_ASPECT_RATIO)
        return LlavaOnevisionForConditionalGeneration(config), processor

    # Published sizes ----------------------------------------------------------------------------------
    def published_config(self) -> LlavaOnevisionConfig:
        """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m (26 blocks, 384 px, patch 14) + Qwen2-7B."""
        return LlavaOnevisionConfig(
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                           "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384,
                           "patch_size": 14, "vision_use_head": False, "layer_norm_eps": 1e-6},
            text_config={"model_type": "qwen2", "vocab_size": 152128, "hidden_size": 3584,
                         "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                         "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                         "tie_word_embeddings": False},
            image_token_index=151646, video_token_index=151647, image_grid_pinpoints=PUBLISHED_GRID_PINPOINTS,
            vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full", vision_feature_layer=-1,
            projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        )

    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """The checkpoints' image settings: 384 px crops, 6x6 pinpoints, SigLIP mean/std, 729 tokens per crop."""
        tiny.add_tokens(tokenizer, IMAGE_TOKENS)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384}, image_grid_pinpoints=PUBLISHED_GRID_PINPOINTS,
            image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        return ImageOnlyLlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                num_image_tokens=729, vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_9")
