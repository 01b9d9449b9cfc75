"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): dynamic resolution, 2x2-merged patches, 3-D M-RoPE."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import (
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tuner.models.families import register_family, tiny
from tuner.models.families.base import (
    Family,
    VisionTowerRun,
    chatml_user_turn,
    check_range,
    scatter_to_vision,
    set_image_processor,
)
from tuner.models.families.grids import ImageGrids, Layout, merge_grids, place_layouts

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# 14 px patches merged 2x2: one image token per 28x28 px; images are resized to multiples of 28.
TINY_PATCH, TINY_MERGE = 14, 2
# The 7B checkpoints' text model (config.json; Qwen2-7B sizes) and vision token ids.
QWEN_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}


class ImageOnlyProcessorMixin:
    """A Qwen processor built without its video processor, for where torchvision cannot be installed.

    Qwen processors carry a video processor that transformers only builds with torchvision, which cannot
    be installed next to a CPU torch (see the README); pruning and evaluation use images only.
    `ProcessorMixin` derives the sub-processors from the `__init__` signature, so leaving `video_processor`
    out of it skips the class check that fails for `video_processor=None`, and `from_pretrained` loads just
    the tokenizer and the image processor. The Qwen `__init__` passes a positional `None` for the video
    processor on to `ProcessorMixin.__init__`, which zips positional arguments with the sub-processor names
    and so drops it. Nothing in transformers is patched.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2VLProcessor(ImageOnlyProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor for images only (see `ImageOnlyProcessorMixin`)."""


class QwenFamily(Family):
    """What the Qwen-VL families share: `<|image_pad|>` tokens, ChatML prompts, positions from the mask."""

    positions_from_mask = True
    reference_quota_rule = "qwen"
    image_placeholder = "<|image_pad|>"
    tiny_image_sizes = ((252, 196), (168, 140))

    def fallback_prompt(self, text: str, n_images: int) -> str:
        return chatml_user_turn(QWEN_IMAGE * n_images + text)

    processor_settings = {"max_pixels": "the most pixels an image is resized to (28 x 28 px per vision token at "
                                        "the 7B sizes)", "min_pixels": "the fewest pixels an image is resized to"}

    def set_processor(self, processor: ProcessorMixin, model: torch.nn.Module,
                      settings: Mapping[str, int]) -> Callable[[], None]:
        """Resize every image to between `min_pixels` and `max_pixels` pixels (the image processor's
        `size` shortest and longest edge, in pixels), each unset one kept as loaded."""
        size = processor.image_processor.size
        low, high = check_range(settings, "min_pixels", "max_pixels", (size["shortest_edge"], size["longest_edge"]))
        return set_image_processor(processor, size={"shortest_edge": low, "longest_edge": high})

    def loaded_processor_settings(self, processor: ProcessorMixin) -> dict[str, int]:
        size = processor.image_processor.size
        return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}

    def continued_positions(self, model: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """M-RoPE: text after the prompt has equal t/h/w positions, offset by the prompt's `rope_deltas`."""
        deltas = model.model.rope_deltas
        deltas = deltas.repeat_interleave(positions.shape[0] // deltas.shape[0], dim=0)
        return (positions + deltas.to(positions.device))[None].expand(3, -1, -1)

    def row_images(self, batch: BatchFeature, row: int) -> dict[str, torch.Tensor]:
        """Patches are concatenated over images: row r's are the r-th block of `image_grid_thw` products."""
        grid = batch["image_grid_thw"]
        bounds = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()
        return {"pixel_values": batch["pixel_values"][bounds[row]:bounds[row + 1]],
                "image_grid_thw": grid[row:row + 1]}

    def image_grids(self, config: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
                    vision: torch.Tensor) -> list[ImageGrids]:
        """`image_grid_thw` / `video_grid_thw` over the image / video tokens: t grids of (h, w) / merge tokens each.

        Falls back to `Family.image_grids` when the grids do not account for exactly those tokens.
        """
        merge = config.vision_config.spatial_merge_size
        parts = []
        for grid_key, id_key in (("image_grid_thw", "image_token_id"), ("video_grid_thw", "video_token_id")):
            token_id, thw = getattr(config, id_key, None), kwargs.get(grid_key)
            if token_id is None:
                continue
            tokens = vision & (input_ids == token_id)
            layouts = [] if thw is None else [Layout.grid(h // merge, w // merge, frames=t) for t, h, w in thw.tolist()]
            placed = place_layouts(tokens, layouts)
            if placed is None:
                return super().image_grids(config, kwargs, input_ids, vision)
            parts.append(placed)
        return merge_grids(parts)

    # Vision-tower saliency (`visionzip`; the subclasses that map it set `vision_saliency_query`) --------
    def vision_attention(self, model: torch.nn.Module) -> torch.nn.Module:
        """The last vision block's attention: its output is what the merger turns into image tokens."""
        return self.image_features_owner(model).visual.blocks[-1].attn

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision model: its calls' `grid_thw` gives each image's patch layout."""
        return self.image_features_owner(model).visual

    def vision_saliency(self, config: Any, run: VisionTowerRun, input_ids: torch.Tensor,
                        vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches in the blocks' order, each group of merge_size^2 averaged into its image token, then put in the
        language model's order (`vision_token_order`). Images only: video frames are another tower call."""
        if bool((vision & (input_ids == config.video_token_id)).any()):
            raise ValueError(f"visionzip on {self.name} supports images only, not video")
        unit = config.vision_config.spatial_merge_size ** 2
        saliency = torch.cat([c.saliency.flatten() for c in run.attention])
        keys = torch.cat([c.keys.flatten(0, 1) for c in run.attention])
        if saliency.numel() % unit:
            raise RuntimeError(f"the vision tower's {saliency.numel()} patches are not groups of {unit}")
        saliency, keys = saliency.view(-1, unit).mean(1), keys.view(-1, unit, keys.shape[-1]).mean(1)
        grids = [call.get("grid_thw") for call in run.tower_calls]
        order = self.vision_token_order(config, None if None in grids or not grids else torch.cat(grids))
        if order is not None:
            saliency, keys = saliency[order.to(saliency.device)], keys[order.to(keys.device)]
        return scatter_to_vision(saliency, vision, "attention"), scatter_to_vision(keys, vision, "keys")

    def vision_token_order(self, config: Any, grid_thw: torch.Tensor | None) -> torch.Tensor | None:
        """Where each image token's merged patch group sits in the vision blocks' sequence (None: the same order)."""
        return None

    # Tiny models -------------------------------------------------------------------------------------
    def tiny_text_config(self, tokenizer: Any, layers: int) -> dict[str, Any]:
        """Qwen text settings: the shared sizes with M-RoPE."""
        return {**tiny.text_sizes(tokenizer, layers),
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                    "mrope_section": tiny.MROPE_SECTION}}

    def tiny_vision_config(self) -> dict[str, Any]:
        """The tiny model's vision tower, as `vision_config` keyword arguments."""
        raise NotImplementedError(f"family {self.name!r} has no tiny vision tower")

    @staticmethod
    def tiny_vision_ids(tokenizer: Any) -> dict[str, int]:
        """Vision placeholder and delimiter ids in the tiny vocabulary."""
        ids = tokenizer.convert_tokens_to_ids
        return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
                "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}

    @staticmethod
    def tiny_image_processor() -> Qwen2VLImageProcessorPil:
        """Qwen image processor limited to 4..256 image tokens per image."""
        unit = TINY_PATCH * TINY_MERGE
        return Qwen2VLImageProcessorPil(min_pixels=4 * unit * unit, max_pixels=256 * unit * unit,
                                        patch_size=TINY_PATCH, merge_size=TINY_MERGE, temporal_patch_size=2)

    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """The family's class (`class_names[0]`) over the tiny text model and `tiny_vision_config()`."""
        model_class = self.transformers_class()
        config = model_class.config_class(text_config=self.tiny_text_config(tokenizer, layers),
                                          vision_config=self.tiny_vision_config(), **self.tiny_vision_ids(tokenizer))
        processor = self.image_only_processor(image_processor=self.tiny_image_processor(), tokenizer=tokenizer)
        return model_class(config), processor

    # Published sizes ---------------------------------------------------------------------------------
    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """preprocessor_config.json of the 7B checkpoints: 4..16384 tokens of 28x28 px per image."""
        image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                                   temporal_patch_size=2)
        return self.image_only_processor(image_processor=image_processor, tokenizer=tokenizer)


@register_family
class Qwen2VL(QwenFamily):
    """Qwen2-VL."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    class_names = ("Qwen2VLForConditionalGeneration",)
    image_only_processor = ImageOnlyQwen2VLProcessor
    vision_saliency_query = "mean"  # no CLS token: the attention each patch receives, averaged over queries
    hub_id = "Qwen/Qwen2-VL-7B-Instruct"
    search_space = "qwen2_vl.yaml"

    def tiny_vision_config(self) -> dict[str, Any]:
        """A two-block vision tower."""
        return {"depth": 2, "embed_dim": 64, "hidden_size": tiny.TEXT_HIDDEN, "num_heads": 4, "mlp_ratio": 2,
                "patch_size": TINY_PATCH, "spatial_merge_size": TINY_MERGE, "temporal_patch_size": 2}

    def published_config(self) -> Qwen2VLConfig:
        """Qwen/Qwen2-VL-7B-Instruct: a 675M-parameter ViT (32 blocks of 1280) merged 2x2 into Qwen2-7B."""
        return Qwen2VLConfig(
            text_config={**QWEN_7B_TEXT, "max_position_embeddings": 32768},
            vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
            **QWEN_IDS,
        )
