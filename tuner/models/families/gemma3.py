"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower pooled to 256 tokens, image tokens attend both ways.

The model builds its masks from `token_type_ids` (1 on image tokens): tokens of one image attend to each other
bidirectionally on top of causal attention, in full layers OR(causal, blockwise) and in the sliding-window
layers AND(sliding_window, OR(causal, blockwise)) (`create_masks_for_vision_model`). The pruned layers get the
same composition over the kept tokens, with each token's image block noted on the full prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    SiglipVisionConfig,
)
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    maybe_pad_block_sequence_ids,
    sliding_window_overlay,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tuner.models.compat import CACHE_KWARG
from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family, PrunedPrefill

# The tokenizer's named image tokens, as the checkpoints' tokenizer_config.json names them.
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")

# Tiny model: 64 px images, 8 px patches -> 8x8 patches, average-pooled 2x2 to 4x4 = 16 image tokens.
TINY_IMAGE_SIZE, TINY_PATCH, TINY_TOKENS_PER_IMAGE = 64, 8, 16
# Sliding window of the tiny text model: shorter than an image, so it really limits the image blocks too.
TINY_WINDOW = 8
# Sliding and full layers alternate, so that pruning at K = 2 leaves both kinds above K, and both kinds below K
# hold the full prompt in the cache (the mask of a pruned layer must be sized against a pruned layer).
TINY_LAYER_PATTERN = ("sliding_attention", "full_attention")


def add_image_tokens(tokenizer: Any) -> Any:
    """Give `tokenizer` Gemma's named image tokens and turn markers (idempotent); returns it.

    `Gemma3Processor` reads `tokenizer.boi_token`, `eoi_token` and `image_token` (and their ids). transformers
    names model-specific special tokens through `_set_model_specific_special_tokens`, which is what loading a
    tokenizer_config.json with those keys does; saving writes them back under the same keys.
    """
    tiny.add_tokens(tokenizer, (*IMAGE_TOKENS.values(), *TURN_TOKENS))
    if getattr(tokenizer, "boi_token", None) is None or getattr(tokenizer, "image_token", None) is None:
        tokenizer._set_model_specific_special_tokens(dict(IMAGE_TOKENS))
    return tokenizer


@register_family
class Gemma3(Family):
    """Gemma 3: 256 pooled SigLIP tokens per image, bidirectional within an image, 5:1 sliding/global layers."""

    name = "gemma3"
    fixed_image_tokens = True
    model_types = ("gemma3",)
    class_names = ("Gemma3ForConditionalGeneration",)
    image_placeholder = IMAGE_TOKENS["boi_token"]
    hub_id = "google/gemma-3-4b-it"
    search_space = "gemma3.yaml"

    # -- prompts ------------------------------------------------------------------------------------
    def processor_images(self, images: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """One list per prompt: Gemma3Processor counts a flat list of a batch's images against one prompt."""
        return [list(row) for row in images]

    def fallback_prompt(self, text: str, n_images: int) -> str:
        return f"<start_of_turn>user\n{self.image_placeholder * n_images}{text}<end_of_turn>\n<start_of_turn>model\n"

    # -- hooks: the bidirectional image blocks --------------------------------------------------------
    def prompt_state(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Each prompt token's image block (-1 on text), numbered on the full prompt as the model numbers them.

        None when the call has no `token_type_ids`: the model then builds plain causal masks too.
        """
        token_type_ids = kwargs.get("token_type_ids")
        if token_type_ids is None:
            return None
        blocks = get_block_sequence_ids_for_mask(token_type_ids, device=input_ids.device)
        # A call may give the prompt's token types for a longer sequence (recomputing a generated continuation
        # without a cache); the model pads them with -1 (text), and so does this.
        return maybe_pad_block_sequence_ids(blocks, None, input_ids.shape[1], 0)

    def gather_state(self, state: torch.Tensor, pruned: PrunedPrefill) -> torch.Tensor:
        """The block ids at the kept positions; padding slots are text (-1)."""
        return state.gather(1, pruned.gather_index).masked_fill(~pruned.valid, -1)

    def layer_mask(self, layer_type: str, *, config: PretrainedConfig, hidden: torch.Tensor,
                   mask_2d: torch.Tensor | None, cache: Any, layer_idx: int, kept_state: Any) -> Any:
        """`create_masks_for_vision_model`'s composition on the kept tokens, sized against layer `layer_idx`.

        In decode (`kept_state` None) the new tokens are text, and the model's own masks are plain causal ones.
        """
        if kept_state is None:
            return super().layer_mask(layer_type, config=config, hidden=hidden, mask_2d=mask_2d, cache=cache,
                                      layer_idx=layer_idx, kept_state=None)
        arguments = {"config": config, "inputs_embeds": hidden, "attention_mask": mask_2d, "position_ids": None,
                     "layer_idx": layer_idx, CACHE_KWARG: cache}
        if layer_type == "full_attention":  # OR(causal, blockwise)
            return create_causal_mask(**arguments, block_sequence_ids=kept_state)
        if layer_type == "sliding_attention":  # AND(sliding_window, OR(causal, blockwise))
            # The overlay reads block ids at every key slot the mask spans, which it does not pad itself.
            blocks = maybe_pad_block_sequence_ids(kept_state, mask_2d, *_mask_sizes(hidden, mask_2d, cache, layer_idx))
            return create_causal_mask(**arguments, or_mask_function=blockwise_overlay(blocks),
                                      and_mask_function=sliding_window_overlay(config.sliding_window))
        raise ValueError(f"Gemma 3 has no attention layer type {layer_type!r}")

    def grid_tokens(self, config: PretrainedConfig) -> int:
        """The SigLIP patches pooled to a square of `mm_tokens_per_image` (256 = 16 x 16) per image."""
        return config.mm_tokens_per_image

    # -- tiny test models ---------------------------------------------------------------------------
    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """A one-block SigLIP tower on 64 px images, pooled to 16 tokens, over alternating sliding/full layers."""
        add_image_tokens(tokenizer)
        sizes = tiny.text_sizes(tokenizer, layers)
        text = Gemma3TextConfig(
            **sizes, head_dim=tiny.TEXT_HIDDEN // tiny.TEXT_HEADS,
            query_pre_attn_scalar=tiny.TEXT_HIDDEN // tiny.TEXT_HEADS, sliding_window=TINY_WINDOW,
            layer_types=[TINY_LAYER_PATTERN[i % 2] for i in range(layers)],
        )
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                    image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, vision_use_head=False)
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
            boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        image_processor = Gemma3ImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                                  do_pan_and_scan=False)
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_length=TINY_TOKENS_PER_IMAGE)
        return Gemma3ForConditionalGeneration(config), processor

    # -- published sizes ----------------------------------------------------------------------------
    def published_config(self) -> Gemma3Config:
        """google/gemma-3-4b-it's config.json: 34 layers (5 sliding of 1,024 per global), SigLIP-So400m at 896 px."""
        text = Gemma3TextConfig(
            vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
            sliding_window=1024, sliding_window_pattern=6, max_position_embeddings=131_072,
            rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0, final_logit_softcapping=None, attn_logit_softcapping=None,
        )
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                    num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=255_999,
                            eoi_token_index=256_000, image_token_index=262_144, eos_token_id=[1, 106])

    def published_processor(self, tokenizer: Any) -> Gemma3Processor:
        """preprocessor_config.json of google/gemma-3-4b-it: 896x896 bilinear, mean/std 0.5, no pan-and-scan."""
        image_processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2,
                                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                                  rescale_factor=1 / 255, do_pan_and_scan=False)
        return Gemma3Processor(image_processor=image_processor, tokenizer=add_image_tokens(tokenizer),
                               image_seq_length=256)


def _mask_sizes(hidden: torch.Tensor, mask_2d: torch.Tensor | None, cache: Any, layer_idx: int) -> tuple[int, int]:
    """(kv_length, kv_offset) of the mask for layer `layer_idx`, as transformers' mask builders size it."""
    if cache is not None:
        return cache.get_mask_sizes(hidden.shape[1], layer_idx)
    return (hidden.shape[1] if mask_2d is None else mask_2d.shape[-1]), 0
