"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): 16 px patches merged 2x2, interleaved M-RoPE, DeepStack.

DeepStack: the vision tower also emits features taken at the ViT blocks `deepstack_visual_indexes`; the text
model adds feature i to the output of decoder layer i (i < the number of entries) at the vision positions
(`visual_pos_masks`), through `Qwen3VLTextModel._deepstack_process`. When pruning happens at or before those
layers, their hidden states hold only the kept tokens, so the extra hook below drops the same positions from
the mask and the same rows from each DeepStack tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    PretrainedConfig,
    ProcessorMixin,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import PrunedPrefill
from tuner.models.families.qwen2_vl import ImageOnlyProcessorMixin, QwenFamily

# 16 px patches merged 2x2: one image token per 32x32 px.
PATCH, MERGE = 16, 2
# Interleaved M-RoPE of the tiny text model: head_dim / 2 = 16 frequencies, t/h/w in Qwen3-VL's 24:20:20 proportion.
TINY_MROPE_SECTION = [6, 5, 5]
# Three DeepStack entries as in the published checkpoints (one per block of a 3-block tiny tower).
TINY_DEEPSTACK = [0, 1, 2]

# Published image-processor settings (preprocessor_config.json of the Qwen3-VL checkpoints).
PUBLISHED_IMAGE_PROCESSOR = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2,
                             "size": {"shortest_edge": 65536, "longest_edge": 16777216},
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# Published vision tower (shared by the 8B and the 30B-A3B checkpoints; `out_hidden_size` is the text width).
PUBLISHED_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                    "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": PATCH,
                    "spatial_merge_size": MERGE, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                    "deepstack_visual_indexes": [8, 16, 24], "initializer_range": 0.02}
PUBLISHED_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                  "mrope_interleaved": True}
PUBLISHED_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                 "vision_end_token_id": 151653}


class ImageOnlyQwen3VLProcessor(ImageOnlyProcessorMixin, Qwen3VLProcessor):
    """Qwen3-VL processor for images only (see `ImageOnlyProcessorMixin`)."""


def kept_deepstack(visual_pos_masks: torch.Tensor, deepstack_embeds: torch.Tensor,
                   pruned: PrunedPrefill) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision mask [B, N] and one DeepStack tensor [V, D] cut to the kept positions of a pruned prefill.

    The DeepStack rows follow the mask's True entries in row-major order, so each vision position's row is
    its rank among them. The mask comes back [B, P] over the gathered slots (False on padding slots), and the
    rows in the order its True entries appear.
    """
    index = pruned.gather_index
    mask = visual_pos_masks.to(index.device).bool()
    if mask.shape[1] != pruned.length:
        raise RuntimeError(f"visual_pos_masks covers {mask.shape[1]} positions but the pruned prompt had "
                           f"{pruned.length}")
    rank = (mask.flatten().cumsum(0) - 1).view_as(mask)
    kept_mask = mask.gather(1, index) & pruned.valid
    rows = rank.gather(1, index)[kept_mask]
    return kept_mask, deepstack_embeds[rows.to(deepstack_embeds.device)]


class _DeepStackTranslation:
    """Wraps `_deepstack_process` on one text model instance so that a pruned prefill adds the kept rows only.

    The wrapper is an instance attribute, so `remove()` restores the class method exactly.
    """

    def __init__(self, text_model: torch.nn.Module, pruned: Callable[[], PrunedPrefill | None]) -> None:
        if "_deepstack_process" in vars(text_model):
            raise RuntimeError(f"{type(text_model).__name__}._deepstack_process is already wrapped")
        self.text_model = text_model
        original = text_model._deepstack_process

        def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                              visual_embeds: torch.Tensor) -> torch.Tensor:
            prefill = pruned()
            if prefill is not None:  # layers >= K of a pruned prefill see the gathered tokens only
                visual_pos_masks, visual_embeds = kept_deepstack(visual_pos_masks, visual_embeds, prefill)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        self._wrapper = deepstack_process
        text_model._deepstack_process = deepstack_process

    def remove(self) -> None:
        if vars(self.text_model).get("_deepstack_process") is self._wrapper:
            del self.text_model._deepstack_process


@register_family
class Qwen3VL(QwenFamily):
    """Qwen3-VL (dense)."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    class_names = ("Qwen3VLForConditionalGeneration",)
    image_only_processor = ImageOnlyQwen3VLProcessor
    hub_id = "Qwen/Qwen3-VL-8B-Instruct"
    search_space = "qwen3_vl.yaml"
    tiny_image_sizes = ((288, 224), (192, 160))  # 9x7 = 63 and 6x5 = 30 image tokens

    # -- hooks ------------------------------------------------------------------------------------
    def extra_hooks(self, text_model: torch.nn.Module,
                    pruned: Callable[[], PrunedPrefill | None]) -> list[Any]:
        """Translate DeepStack's vision mask and features to the kept tokens (see `_DeepStackTranslation`)."""
        return [_DeepStackTranslation(text_model, pruned)]

    def reference_after_layer(self, text_model: torch.nn.Module, index: int, hidden: torch.Tensor,
                              text_kwargs: dict[str, Any], kept: torch.Tensor) -> torch.Tensor:
        """DeepStack feature `index` added at the kept vision positions (batch 1), computed directly."""
        embeds = text_kwargs.get("deepstack_visual_embeds")
        if embeds is None or index >= len(embeds):
            return hidden
        vision_positions = text_kwargs["visual_pos_masks"][0].nonzero().squeeze(1).tolist()
        hidden = hidden.clone()
        for slot, position in enumerate(kept.tolist()):
            if position in vision_positions:
                hidden[0, slot] += embeds[index][vision_positions.index(position)].to(hidden.dtype)
        return hidden

    # -- tiny test models ---------------------------------------------------------------------------
    def tiny_text_config(self, tokenizer: Any, layers: int) -> dict[str, Any]:
        """The shared sizes (head_dim set: Qwen3's default is 128) with interleaved M-RoPE."""
        return {**tiny.text_sizes(tokenizer, layers), "head_dim": tiny.TEXT_HIDDEN // tiny.TEXT_HEADS,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                    "mrope_section": TINY_MROPE_SECTION, "mrope_interleaved": True}}

    def tiny_vision_config(self) -> dict[str, Any]:
        """A 3-block tower with a DeepStack merger after each block."""
        return {"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                "out_hidden_size": tiny.TEXT_HIDDEN, "patch_size": PATCH, "spatial_merge_size": MERGE,
                "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": TINY_DEEPSTACK}

    @staticmethod
    def tiny_image_processor() -> Qwen2VLImageProcessorPil:
        """Qwen3-VL image processor limited to 4..256 image tokens per image."""
        pixels = (PATCH * MERGE) ** 2
        return Qwen2VLImageProcessorPil(**{**PUBLISHED_IMAGE_PROCESSOR,
                                           "size": {"shortest_edge": 4 * pixels, "longest_edge": 256 * pixels}})

    # -- published sizes ----------------------------------------------------------------------------
    def published_config(self) -> PretrainedConfig:
        """Qwen/Qwen3-VL-8B-Instruct's config.json (36 layers, 4096 wide, 32 heads over 8 KV heads)."""
        text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "attention_bias": False,
                "rope_parameters": PUBLISHED_ROPE, "bos_token_id": 151643, "eos_token_id": 151645}
        return Qwen3VLConfig(text_config=text, vision_config={**PUBLISHED_VISION, "out_hidden_size": 4096},
                             tie_word_embeddings=False, **PUBLISHED_IDS)

    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """The checkpoints' image settings: 16 px patches, 2x2 merge, 64..16384 image tokens, mean/std 0.5."""
        return self.image_only_processor(image_processor=Qwen2VLImageProcessorPil(**PUBLISHED_IMAGE_PROCESSOR),
                                         tokenizer=tokenizer)
