"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL with mixture-of-experts MLPs.

Vision tower, DeepStack, interleaved M-RoPE and processor are Qwen3-VL's (`qwen3_vl.py`); only the text MLPs
differ, which the cost model reads as the active experts' width.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3VLMoeConfig

from tuner.models.cost import TextDims
from tuner.models.families import register_family
from tuner.models.families.qwen3_vl import PUBLISHED_IDS, PUBLISHED_ROPE, PUBLISHED_VISION, Qwen3VL


@register_family
class Qwen3VLMoe(Qwen3VL):
    """Qwen3-VL-MoE."""

    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    class_names = ("Qwen3VLMoeForConditionalGeneration",)
    hub_id = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    search_space = "qwen3_vl_moe.yaml"

    def text_dims(self, config: PretrainedConfig) -> TextDims:
        """Each token runs `num_experts_per_tok` experts of `moe_intermediate_size` (the router is left out)."""
        text = self.text_config(config)
        dims = TextDims.from_config(text)
        sparse = [text.num_experts > 0 and index not in text.mlp_only_layers
                  and (index + 1) % text.decoder_sparse_step == 0 for index in range(text.num_hidden_layers)]
        if not any(sparse):
            return dims
        if not all(sparse):
            raise ValueError("the cost model holds one MLP width for all layers; this checkpoint mixes dense "
                             f"(mlp_only_layers={text.mlp_only_layers}, decoder_sparse_step="
                             f"{text.decoder_sparse_step}) and MoE layers")
        return TextDims(**{**vars(dims), "intermediate": text.num_experts_per_tok * text.moe_intermediate_size})

    def tiny_text_config(self, tokenizer: Any, layers: int) -> dict[str, Any]:
        """Qwen3-VL's tiny text model with 4 experts of 64, two per token, in every layer."""
        return {**super().tiny_text_config(tokenizer, layers), "num_experts": 4, "num_experts_per_tok": 2,
                "moe_intermediate_size": 64, "decoder_sparse_step": 1, "tie_word_embeddings": False}

    def published_config(self) -> PretrainedConfig:
        """Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (48 layers, 2048 wide, 128 experts of 768, 8 active)."""
        text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu",
                "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "attention_bias": False,
                "rope_parameters": PUBLISHED_ROPE, "num_experts": 128, "num_experts_per_tok": 8,
                "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "bos_token_id": 151643, "eos_token_id": 151645}
        return Qwen3VLMoeConfig(text_config=text, vision_config={**PUBLISHED_VISION, "out_hidden_size": 2048},
                                tie_word_embeddings=False, **PUBLISHED_IDS)
