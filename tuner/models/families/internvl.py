"""InternVL (`InternVLForConditionalGeneration`, the `-hf` checkpoints): 448 px tiles, pixel shuffle, Qwen2 decoder.

Each image is cut into up to `max_patches` 448 px tiles on the grid closest to its aspect ratio, plus a
thumbnail tile when there is more than one; a tile's 32x32 InternViT patches are pixel-shuffled 2x2 into
256 tokens. The prompt holds `<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>`: only `<IMG_CONTEXT>` (the
config's `image_token_id`) carries image features, so the tiles of one image form one pool of vision tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import (
    BatchFeature,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family, chatml_user_turn, check_range, set_image_processor
from tuner.models.families.qwen2_vl import ImageOnlyProcessorMixin

# The named tokens InternVLProcessor reads from its tokenizer (`tokenizer.start_image_token`, ...).
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# Tiny tiles: 64 px, 8 px patches -> 8x8 patches, pixel-shuffled 2x2 -> 16 tokens per tile; up to 4 tiles.
TINY_TILE, TINY_PATCH, TINY_MAX_TILES = 64, 8, 4
TINY_TOKENS_PER_TILE = (TINY_TILE // TINY_PATCH) ** 2 // 4
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class ImageOnlyInternVLProcessor(ImageOnlyProcessorMixin, InternVLProcessor):
    """InternVL processor for images only (its video processor needs torchvision; see `ImageOnlyProcessorMixin`).

    `image_seq_length` is named in the signature: `from_pretrained` passes on, and `to_dict` saves, only the
    settings it names.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_seq_length=image_seq_length,
                         **kwargs)


def add_image_tokens(tokenizer: Any) -> Any:
    """Give `tokenizer` InternVL's named image tokens, as the `-hf` checkpoints' tokenizer config names them."""
    tiny.add_tokens(tokenizer, IMAGE_TOKENS.values())
    # Named model-specific tokens, saved into tokenizer_config.json as the checkpoints have them.
    tokenizer._set_model_specific_special_tokens(IMAGE_TOKENS)
    return tokenizer


@register_family
class InternVL(Family):
    """InternVL 2.5 / 3 (`-hf`): tiles of 256 `<IMG_CONTEXT>` tokens between `<img>` and `</img>`, 1-D RoPE."""

    name = "internvl"
    model_types = ("internvl",)
    class_names = ("InternVLForConditionalGeneration",)
    image_placeholder = "<IMG_CONTEXT>"
    image_only_processor = ImageOnlyInternVLProcessor
    hub_id = "OpenGVLab/InternVL3-8B-hf"
    search_space = "internvl.yaml"
    # Row 0: a 2:1 image -> 2x1 tiles + thumbnail (48 tokens); row 1: square -> one tile (16 tokens).
    tiny_image_sizes = ((192, 96), (96, 96))

    processor_settings = {"max_patches": "the most tiles an image is cut into (each `image_seq_length` vision "
                                         "tokens; a thumbnail tile too when there are several)",
                          "min_patches": "the fewest tiles an image is cut into"}

    def set_processor(self, processor: ProcessorMixin, model: torch.nn.Module,
                      settings: Mapping[str, int]) -> Callable[[], None]:
        """Cut every image into between `min_patches` and `max_patches` tiles on the grid nearest its aspect ratio
        (the GotOcr2 image processor's own attributes), each unset one kept as loaded."""
        images = processor.image_processor
        low, high = check_range(settings, "min_patches", "max_patches", (images.min_patches, images.max_patches))
        return set_image_processor(processor, min_patches=low, max_patches=high)

    def loaded_processor_settings(self, processor: ProcessorMixin) -> dict[str, int]:
        images = processor.image_processor
        return {"min_patches": images.min_patches, "max_patches": images.max_patches}

    def fallback_prompt(self, text: str, n_images: int) -> str:
        """The `-hf` chat template's user turn: one `<IMG_CONTEXT>` line per image, ChatML."""
        return chatml_user_turn(f"{self.image_placeholder}\n" * n_images + text)

    def row_images(self, batch: BatchFeature, row: int) -> dict[str, torch.Tensor]:
        """Tiles are concatenated over images; row r's tiles follow from its share of the image tokens.

        The processor drops its per-image tile counts (`num_patches`), so they are recovered from `input_ids`:
        the image token is the id filling most non-padding positions (each tile brings a run of them), and every
        tile brings the same number.
        """
        ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        image_id = ids[attention].mode().values
        per_row = ((ids == image_id) & attention).sum(1)
        per_tile = int(per_row.sum()) // batch["pixel_values"].shape[0]
        bounds = torch.cat([per_row.new_zeros(1), (per_row // per_tile).cumsum(0)]).tolist()
        return {"pixel_values": batch["pixel_values"][bounds[row]:bounds[row + 1]]}

    def grid_tokens(self, config: Any) -> int:
        """One square per tile: `image_seq_length` (256 = 16 x 16) pixel-shuffled tokens, the thumbnail too."""
        return config.image_seq_length

    # Tiny test model --------------------------------------------------------------------------------
    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """One-block InternViT on 64 px tiles (16 tokens each), up to 4 tiles + thumbnail, Qwen2 text model."""
        add_image_tokens(tokenizer)
        config = InternVLConfig(
            vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "image_size": TINY_TILE, "patch_size": TINY_PATCH},
            text_config=Qwen2Config(**tiny.text_sizes(tokenizer, layers)),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
            image_seq_length=TINY_TOKENS_PER_TILE, downsample_ratio=0.5, tie_word_embeddings=False,
        )
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": TINY_TILE, "width": TINY_TILE}, crop_to_patches=True, min_patches=1,
            max_patches=TINY_MAX_TILES, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        processor = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               image_seq_length=TINY_TOKENS_PER_TILE)
        return InternVLForConditionalGeneration(config), processor

    # Published sizes ----------------------------------------------------------------------------------
    def published_config(self) -> InternVLConfig:
        """OpenGVLab/InternVL3-8B-hf: InternViT-300M (24 blocks, 448 px, patch 14) + Qwen2.5-7B (28 layers)."""
        return InternVLConfig(
            vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "image_size": 448, "patch_size": 14,
                           "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "use_qk_norm": False,
                           "attention_bias": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True},
            text_config={"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 3584,
                         "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                         "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                         "tie_word_embeddings": False},
            image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
        )

    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """InternVL3's GotOcr2 image processor: 448 px tiles, 1-12 of them plus a thumbnail, ImageNet mean/std."""
        add_image_tokens(tokenizer)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=256)
