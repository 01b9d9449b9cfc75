"""Idefics3 (`Idefics3ForConditionalGeneration`, also SmolVLM v1): image splitting, pixel shuffle, Llama decoder.

An image is resized so that its longest edge fits `size`, split into a grid of `max_image_size` sub-images,
and followed by a global view of the whole image; a batch pads each prompt's sub-images with all-zero ones
(`pixel_attention_mask` 0), which the model drops. Each sub-image's SigLIP patches are pixel-shuffled by
`scale_factor` into `image_seq_len` `<image>` tokens. In the prompt every sub-image's run is preceded by
`<fake_token_around_image><row_i_col_j>` (the global one by `<fake_token_around_image><global-img>`) and the
grid rows end in newlines: those are text tokens inside the image region; only `<image>` is a vision token, so
the runs of all sub-images form one pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Idefics3Config, Idefics3Processor, PreTrainedModel, ProcessorMixin
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family, set_image_processor

# Tiny sub-images: 64 px, patch 8 -> 8x8 patches, shuffled by 2 -> 16 `<image>` tokens; images up to 128 px (2x2).
TINY_TILE, TINY_PATCH, TINY_SCALE = 64, 8, 2
TINY_IMAGE_SEQ_LEN = (TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE ** 2
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# Text tokens of the image layout, added to the tiny tokenizer (the checkpoints' vocabularies have them).
LAYOUT_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))]


@register_family
class Idefics3(Family):
    """Idefics3: sub-images plus a global image, `image_seq_len` `<image>` tokens each, between layout text tokens."""

    name = "idefics3"
    model_types = ("idefics3",)
    class_names = ("Idefics3ForConditionalGeneration",)
    hub_id = "HuggingFaceM4/Idefics3-8B-Llama3"
    search_space = "idefics3.yaml"
    # Row 0: 2:1 -> 1x2 sub-images + global (48 tokens); row 1: 2:3 -> 2x2 + global (80 tokens).
    tiny_image_sizes = ((128, 64), (60, 90))
    # The processor classes, and the published sub-image side and tokens per sub-image (`published_processor`).
    processor_class: type[ProcessorMixin] = Idefics3Processor
    image_processor_class: type = Idefics3ImageProcessorPil
    published_sub_image, published_image_seq_len = 364, 169

    processor_settings = {"longest_edge": "the longest edge in pixels an image is resized to before it is split "
                                          "into `max_image_size` sub-images (`image_seq_len` tokens each, plus the "
                                          "global image)"}

    def set_processor(self, processor: ProcessorMixin, model: torch.nn.Module,
                      settings: Mapping[str, int]) -> Callable[[], None]:
        """Resize every image to at most `longest_edge` px on its longest edge (the image processor's `size`), so
        it splits into fewer or more sub-images; a tile's own size (`max_image_size`) is the model's and stays."""
        return set_image_processor(processor, size={"longest_edge": settings["longest_edge"]})

    def loaded_processor_settings(self, processor: ProcessorMixin) -> dict[str, int]:
        return {"longest_edge": processor.image_processor.size["longest_edge"]}

    def fallback_prompt(self, text: str, n_images: int) -> str:
        """The checkpoints' chat format: `User:` images and question `<end_of_utterance>`, then `Assistant:`."""
        return f"User:{self.image_placeholder * n_images}{text}<end_of_utterance>\nAssistant:"

    def grid_tokens(self, config: Any) -> int:
        """One square per sub-image and the global image: (image_size / patch / scale_factor)^2 tokens."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size // config.scale_factor) ** 2

    # Tiny test model --------------------------------------------------------------------------------
    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """One-block SigLIP-style tower on 64 px sub-images, shuffled by 2, over a Llama text model; images
        resized to at most 128 px and split into 64 px sub-images (up to 2x2) plus the global one."""
        tiny.add_tokens(tokenizer, LAYOUT_TOKENS)
        model_class = self.transformers_class()
        config = model_class.config_class(
            vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "image_size": TINY_TILE, "patch_size": TINY_PATCH},
            text_config=tiny.llama_text_config(tokenizer, layers), scale_factor=TINY_SCALE,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
        image_processor = self.image_processor_class(
            size={"longest_edge": 2 * TINY_TILE}, max_image_size={"longest_edge": TINY_TILE},
            do_image_splitting=True, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        processor = self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                         image_seq_len=TINY_IMAGE_SEQ_LEN)
        return model_class(config), processor

    # Published sizes ----------------------------------------------------------------------------------
    def published_config(self) -> Idefics3Config:
        """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP so400m at 364 px (27 blocks), scale 2, Llama 3.1 8B."""
        return Idefics3Config(
            vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                           "num_attention_heads": 16, "image_size": 364, "patch_size": 14},
            text_config={"model_type": "llama", "vocab_size": 128259, "hidden_size": 4096,
                         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
            scale_factor=2, image_token_id=128257, pad_token_id=128002, tie_word_embeddings=False,
        )

    def published_vision_tokens(self, config: Any, image_inputs: dict[str, torch.Tensor]) -> int:
        """Sub-images x the tokens the connector makes of one: (image_size / patch)^2 / scale_factor^2.

        The model's vision path drops all-zero filler sub-images by testing the pixel values (`nonzero`), which
        cannot run on the meta device; every sub-image of a single image is real, so all of them count.
        """
        vision = config.vision_config
        n_sub_images = image_inputs["pixel_values"].shape[0] * image_inputs["pixel_values"].shape[1]
        return n_sub_images * (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2

    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """The checkpoints' image settings: longest edge 4 sub-images, `published_image_seq_len` tokens each."""
        tiny.add_tokens(tokenizer, LAYOUT_TOKENS)
        side = self.published_sub_image
        image_processor = self.image_processor_class(
            size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side}, do_image_splitting=True,
            image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_len=self.published_image_seq_len)
