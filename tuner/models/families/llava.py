"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop, 576 image tokens at 336 px, Llama/Vicuna decoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedModel, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import Family, ProcessorSettingError, VisionTowerRun, scatter_to_vision

# CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-1.5 and LLaVA-NeXT (their config.json "vision_config").
CLIP_L336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
             "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
             "projection_dim": 768}
# Their processor_config.json: 24x24 patches + the CLS token, which the "default" strategy drops.
CLIP_L336_PROCESSOR = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


@register_family
class Llava(Family):
    """LLaVA-1.5: the image placeholder repeated once per CLIP patch, plain causal masks, 1-D RoPE."""

    name = "llava"
    fixed_image_tokens = True
    model_types = ("llava",)
    class_names = ("LlavaForConditionalGeneration",)
    reference_quota_rule = "llava15"
    hub_id = "llava-hf/llava-1.5-7b-hf"
    search_space = "llava15.yaml"

    def grid_tokens(self, config: Any) -> int:
        """One square crop per image: `image_seq_length` (576 = 24 x 24 at 336 px)."""
        return config.image_seq_length

    processor_settings = {"image_size": "the square crop's side in pixels: (side / patch)^2 vision tokens"}

    def set_processor(self, processor: ProcessorMixin, model: torch.nn.Module,
                      settings: Mapping[str, int]) -> Callable[[], None]:
        """Resize and crop every image to `image_size` px; away from the tower's own size, CLIP interpolates its
        position embeddings (`interpolate_pos_encoding`), as transformers does for other resolutions."""
        side, vision = settings["image_size"], model.config.vision_config
        if side % vision.patch_size:
            raise ProcessorSettingError(f"processor.image_size {side} is not a multiple of the vision tower's patch "
                                        f"size {vision.patch_size}")
        images = processor.image_processor
        saved = images.size, images.crop_size
        images.size, images.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
        hook = None
        if side != vision.image_size:
            hook = model.model.vision_tower.register_forward_pre_hook(_interpolating, with_kwargs=True)

        def undo() -> None:
            images.size, images.crop_size = saved
            if hook is not None:
                hook.remove()
        return undo

    def loaded_processor_settings(self, processor: ProcessorMixin) -> dict[str, int]:
        return {"image_size": processor.image_processor.crop_size["height"]}

    vision_saliency_query = "cls"

    def vision_attention(self, model: torch.nn.Module) -> torch.nn.Module:
        """CLIP's attention in the layer `vision_feature_layer` reads (hidden_states[v] is layer v's output for
        v < 0, layer v - 1's for v > 0); one layer only, as the features of several are concatenated."""
        layer = model.config.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or layer == 0:
            raise ValueError(f"vision-tower saliency needs one vision_feature_layer that is a layer's output, "
                             f"got {layer!r}")
        tower = self.image_features_owner(model).vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers 5: CLIPVisionModel.encoder
        index = layer + len(layers) if layer < 0 else layer - 1
        if not 0 <= index < len(layers):
            raise ValueError(f"vision_feature_layer {layer} is outside the vision tower's {len(layers)} layers")
        return layers[index].self_attn

    def vision_saliency(self, config: Any, run: VisionTowerRun, input_ids: torch.Tensor,
                        vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's patches map 1:1 onto its image tokens, in order; the "default" strategy drops the CLS token."""
        first = 1 if config.vision_feature_select_strategy == "default" else 0
        saliency = torch.cat([c.saliency[:, first:] for c in run.attention]).flatten()
        keys = torch.cat([c.keys[:, first:] for c in run.attention]).flatten(0, 1)
        return scatter_to_vision(saliency, vision, "attention rows"), scatter_to_vision(keys, vision, "keys")

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

    def published_config(self) -> LlavaConfig:
        """llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 (Llama-2 7B sizes) behind CLIP ViT-L/14-336."""
        return LlavaConfig(
            text_config={"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 32001},
            vision_config=CLIP_L336, image_token_index=32000, image_seq_length=576, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
        )

    def published_processor(self, tokenizer: Any) -> LlavaProcessor:
        """One 336 px center crop (shortest edge resized to 336)."""
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **CLIP_L336_PROCESSOR)


def _interpolating(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A vision tower call that interpolates its position embeddings to the image's size."""
    return args, {**kwargs, "interpolate_pos_encoding": True}
