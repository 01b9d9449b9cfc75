"""SmolVLM 2 (`SmolVLMForConditionalGeneration`): Idefics3's image splitting and pixel shuffle under its own classes.

For images, SmolVLM's processor writes the same layout as Idefics3's (`<fake_token_around_image>`,
`<row_i_col_j>`, `<global-img>`, `image_seq_len` `<image>` tokens per sub-image) and its model merges them the
same way; it adds video, whose processor needs torchvision and whose frame prompts need `num2words`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import ProcessorMixin, SmolVLMConfig, SmolVLMProcessor
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from tuner.models.families import register_family
from tuner.models.families.idefics3 import Idefics3


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM processor for images only: no video processor (torchvision) and no `num2words` (video prompts).

    `SmolVLMProcessor.__init__` requires both; this one sets the same image attributes from the tokenizer and
    leaves the video ones out. Prompt building, image token replacement and the chat template are SmolVLM's own.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_len: int = 169,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


@register_family
class SmolVLM(Idefics3):
    """SmolVLM 2: as Idefics3, with SmolLM2 text models and ChatML-style turns."""

    name = "smolvlm"
    model_types = ("smolvlm",)
    class_names = ("SmolVLMForConditionalGeneration",)
    image_only_processor = processor_class = ImageOnlySmolVLMProcessor
    image_processor_class = SmolVLMImageProcessorPil
    published_sub_image, published_image_seq_len = 384, 81
    hub_id = "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
    search_space = "smolvlm.yaml"

    def fallback_prompt(self, text: str, n_images: int) -> str:
        """The checkpoints' chat format: `<|im_start|>User:` images and question, then `Assistant:`."""
        return f"<|im_start|>User:{self.image_placeholder * n_images}{text}<end_of_utterance>\nAssistant:"

    def processor_images(self, images: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """One list per prompt: SmolVLM's processor reads a flat list as all the images of a single prompt."""
        return [list(row) for row in images]

    def published_config(self) -> SmolVLMConfig:
        """HuggingFaceTB/SmolVLM2-2.2B-Instruct: SigLIP so400m at 384 px (27 blocks), scale 3, SmolLM2-1.7B."""
        return SmolVLMConfig(
            vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                           "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
            text_config={"model_type": "llama", "vocab_size": 49280, "hidden_size": 2048,
                         "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                         "num_key_value_heads": 32, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}},
            scale_factor=3, image_token_id=49190, pad_token_id=2, tie_word_embeddings=False,
        )
