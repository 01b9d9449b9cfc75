"""Sizes and pieces shared by the families' tiny random-weight test models (`Family.tiny`).

Every tiny model puts the same small text model (4 heads over 2 KV heads, head_dim 32) behind its family's
vision tower, so the property tests run in seconds on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig

TEXT_HIDDEN, TEXT_HEADS, TEXT_KV_HEADS = 128, 4, 2
# M-RoPE t/h/w split of head_dim / 2 = 16 rotary frequencies, in Qwen2-VL's 16:24:24 proportion.
MROPE_SECTION = [4, 6, 6]
# CLIP towers: 112 px crops, patch 14 -> 8x8 = 64 patch tokens per crop (CLS dropped).
CLIP_IMAGE_SIZE, CLIP_PATCH = 112, 14


def token_ids(tokenizer: Any) -> dict[str, int]:
    """Special token ids the text configs need, so they match the tiny vocabulary."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def add_tokens(tokenizer: Any, tokens: Iterable[str]) -> Any:
    """Add those of `tokens` missing from `tokenizer`'s vocabulary as special tokens (idempotent); returns it.

    The tiny vocabulary lacks a family's image and layout tokens, which its checkpoints' tokenizers have.
    """
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def text_sizes(tokenizer: Any, layers: int) -> dict[str, Any]:
    """The shared text-model sizes, as config keyword arguments."""
    return {"vocab_size": len(tokenizer), "hidden_size": TEXT_HIDDEN, "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": layers, "num_attention_heads": TEXT_HEADS, "num_key_value_heads": TEXT_KV_HEADS,
            "max_position_embeddings": 2048, **token_ids(tokenizer)}


def llama_text_config(tokenizer: Any, layers: int) -> LlamaConfig:
    """Llama text model (LLaVA families)."""
    return LlamaConfig(**text_sizes(tokenizer, layers))


def clip_vision_config() -> CLIPVisionConfig:
    """Two-layer CLIP vision tower (`vision_feature_layer=-2` reads the first layer's output)."""
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH, projection_dim=64)


def llava_processor_kwargs() -> dict[str, Any]:
    """LLaVA processor settings that make the token count match the features with the CLS token dropped."""
    return {"patch_size": CLIP_PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
