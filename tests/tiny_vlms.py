"""Tiny random-weight vision-language models of four families, built offline for tests.

Nothing is downloaded: the tokenizer is a BPE trained on a few sentences, the configs are written here and the
weights are random. Each family is saved with ``save_pretrained`` and reloaded through the same
``from_pretrained`` calls that real checkpoints go through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tuner.transformers_compat import cache_from_output
from tuner.models.processors import IMAGE_ONLY_PROCESSORS, ImageOnlyQwen2_5_VLProcessor, ImageOnlyQwen2VLProcessor

# Test models by name: the four families, plus "llava_local", LLaVA-1.5 over a Qwen2 text model whose layers
# alternate sliding-window and full attention (the embedded model's text model has sliding-window layers too).
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_local")

_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
_EXTRA_SPECIAL_TOKENS = [
    "<image>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
]
_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A cat sitting on a red sofa next to a window.",
    "Describe the picture in detail. The photo shows a dog, a ball and some green grass.",
    "How many people are there? There are three people standing near a blue car on the street.",
    "What colour is the large object on the left side of the picture, and what is it made of?",
    "user assistant the quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ' \" ( ) - _",
]
_VOCAB_SIZE = 400

# Text model shared by all families: 4 heads over 2 KV heads (GQA), head_dim 32.
_TEXT_HIDDEN, _TEXT_HEADS, _TEXT_KV_HEADS = 128, 4, 2
# M-RoPE t/h/w split of head_dim / 2 = 16 rotary frequencies, in Qwen2-VL's 16:24:24 proportion.
_MROPE_SECTION = [4, 6, 6]

# LLaVA(-NeXT) vision tower: 112 px crops, patch 14 -> 8x8 = 64 patch tokens per crop (CLS dropped).
_CLIP_IMAGE_SIZE, _CLIP_PATCH = 112, 14
# LLaVA-NeXT anyres grids ([height, width]): a base crop plus two high-res crops per image.
_GRID_PINPOINTS = [[112, 224], [224, 112]]

# Qwen: 14 px patches merged 2x2, so one image token per 28x28 px; images are resized to multiples of 28.
_QWEN_PATCH, _QWEN_MERGE = 14, 2

_QUESTIONS = (
    "What is shown in this image? Describe the colours and shapes.",
    "Describe it.",
)
# (width, height) per family for batch rows 0 and 1; batch 1 uses row 0's image.
_IMAGE_SIZES = {
    "llava": ((160, 120), (120, 160)),
    "llava_local": ((160, 120), (120, 160)),
    "llava_next": ((200, 120), (120, 180)),
    "qwen2_vl": ((252, 196), (168, 140)),
    "qwen2_5_vl": ((252, 196), (168, 140)),
}


_QWEN_PROCESSORS = IMAGE_ONLY_PROCESSORS


def _check_family(family: str) -> None:
    """Reject unknown family names early with the list of valid ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE offline and wrap it with the chat and vision special tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS + _EXTRA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=_EXTRA_SPECIAL_TOKENS,
        padding_side="left",
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Special token ids that the text configs need, so they match the tiny vocabulary."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def _llama_text_config(tokenizer: PreTrainedTokenizerFast, layers: int) -> LlamaConfig:
    """Llama text model for the LLaVA families."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=layers, num_attention_heads=_TEXT_HEADS, num_key_value_heads=_TEXT_KV_HEADS,
        max_position_embeddings=2048, **_token_ids(tokenizer),
    )


def _clip_vision_config() -> CLIPVisionConfig:
    """Two-layer CLIP vision tower (``vision_feature_layer=-2`` reads the first layer's output)."""
    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=_CLIP_IMAGE_SIZE, patch_size=_CLIP_PATCH, projection_dim=64,
    )


def _llava_processor_kwargs() -> dict[str, Any]:
    """Processor settings that make the token count match the features with the CLS token dropped."""
    return {"patch_size": _CLIP_PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def _build_llava(tokenizer: PreTrainedTokenizerFast, layers: int,
                 text_config: Any = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-1.5 layout: one 112 px crop -> 8x8 image tokens (over a Llama text model unless given another)."""
    config = LlavaConfig(
        vision_config=_clip_vision_config(), text_config=text_config or _llama_text_config(tokenizer, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(_CLIP_IMAGE_SIZE // _CLIP_PATCH) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _CLIP_IMAGE_SIZE},
        crop_size={"height": _CLIP_IMAGE_SIZE, "width": _CLIP_IMAGE_SIZE},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **_llava_processor_kwargs())
    return LlavaForConditionalGeneration(config), processor


# Sliding window of the "llava_local" test model: far shorter than its 64 image tokens, so it really limits.
_LOCAL_WINDOW = 8


def _build_llava_local(tokenizer: PreTrainedTokenizerFast, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-1.5 layout over a Qwen2 text model alternating sliding-window and full-attention layers, so that
    pruning at K = 2 meets both kinds before and after K."""
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=layers, num_attention_heads=_TEXT_HEADS, num_key_value_heads=_TEXT_KV_HEADS,
        max_position_embeddings=2048, use_sliding_window=True, sliding_window=_LOCAL_WINDOW,
        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)], **_token_ids(tokenizer),
    )
    return _build_llava(tokenizer, layers, text)


def _build_llava_next(tokenizer: PreTrainedTokenizerFast, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-NeXT anyres layout: base crop + two high-res crops, unpadded, with an image_newline per row."""
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(), text_config=_llama_text_config(tokenizer, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_GRID_PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _CLIP_IMAGE_SIZE},
        crop_size={"height": _CLIP_IMAGE_SIZE, "width": _CLIP_IMAGE_SIZE},
        image_grid_pinpoints=_GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **_llava_processor_kwargs())
    return LlavaNextForConditionalGeneration(config), processor


def _qwen_text_config(tokenizer: PreTrainedTokenizerFast, layers: int) -> dict[str, Any]:
    """Qwen text model settings (same for Qwen2-VL and Qwen2.5-VL)."""
    return {
        "vocab_size": len(tokenizer), "hidden_size": _TEXT_HIDDEN, "intermediate_size": 2 * _TEXT_HIDDEN,
        "num_hidden_layers": layers, "num_attention_heads": _TEXT_HEADS, "num_key_value_heads": _TEXT_KV_HEADS,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE_SECTION},
        **_token_ids(tokenizer),
    }


def _qwen_vision_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Vision placeholder and delimiter ids in the tiny vocabulary."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def _qwen_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen image processor limited to 4..256 image tokens per image."""
    unit = _QWEN_PATCH * _QWEN_MERGE
    return Qwen2VLImageProcessorPil(
        min_pixels=4 * unit * unit, max_pixels=256 * unit * unit,
        patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE, temporal_patch_size=2,
    )


def _build_qwen2_vl(tokenizer: PreTrainedTokenizerFast, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2-VL with a two-block vision tower."""
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, layers),
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": _TEXT_HIDDEN, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": _QWEN_PATCH, "spatial_merge_size": _QWEN_MERGE, "temporal_patch_size": 2},
        **_qwen_vision_ids(tokenizer),
    )
    processor = ImageOnlyQwen2VLProcessor(image_processor=_qwen_image_processor(), tokenizer=tokenizer)
    return Qwen2VLForConditionalGeneration(config), processor


def _build_qwen2_5_vl(tokenizer: PreTrainedTokenizerFast, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2.5-VL with a windowed block and a full-attention block (window 112 px = 4x4 tokens)."""
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, layers),
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                       "out_hidden_size": _TEXT_HIDDEN, "patch_size": _QWEN_PATCH,
                       "spatial_merge_size": _QWEN_MERGE, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [1]},
        **_qwen_vision_ids(tokenizer),
    )
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=_qwen_image_processor(), tokenizer=tokenizer)
    return Qwen2_5_VLForConditionalGeneration(config), processor


_BUILDERS = {
    "llava": _build_llava,
    "llava_local": _build_llava_local,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
}


def build_and_save(family: str, path: str | Path, *, text_layers: int = 4, seed: int = 0) -> None:
    """Build a seeded tiny model of ``family`` and its processor, and save both under ``path``.

    Qwen processors are saved as their tokenizer and image processor, the layout of a real checkpoint minus its
    video processor config; saving the test-only processor class by name would make ``AutoProcessor`` silently
    return a bare tokenizer. ``load`` rebuilds the processor.
    """
    _check_family(family)
    tokenizer = _make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family](tokenizer, text_layers)
    model.save_pretrained(path)
    if family in _QWEN_PROCESSORS:
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
    else:
        processor.save_pretrained(path)


def load(family: str, path: str | Path, *, attn_implementation: str = "sdpa",
         dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Reload a saved tiny model (eval mode) and its processor (left padding) through ``from_pretrained``."""
    _check_family(family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    if family in _QWEN_PROCESSORS:
        processor = _QWEN_PROCESSORS[family].from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


_IMAGE_BLOCK = 28


def _make_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB image of uniform colour blocks, so that many patches are near-duplicates as in natural images."""
    rng = np.random.default_rng(seed)
    grid = (-(-height // _IMAGE_BLOCK), -(-width // _IMAGE_BLOCK), 3)
    blocks = rng.integers(0, 256, size=grid, dtype=np.uint8)
    pixels = blocks.repeat(_IMAGE_BLOCK, axis=0).repeat(_IMAGE_BLOCK, axis=1)[:height, :width]
    return Image.fromarray(pixels)


def _prompt(family: str, question: str) -> str:
    """One-image user turn in the family's chat format, ending where the assistant's answer starts."""
    if family in _QWEN_PROCESSORS:
        return ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                f"{question}<|im_end|>\n<|im_start|>assistant\n")
    return f"USER: <image>\n{question} ASSISTANT:"


def make_inputs(family: str, processor: ProcessorMixin, *, batch: int = 1, seed: int = 0) -> BatchFeature:
    """Processor output for one image-question pair (batch 1) or two with different lengths (batch 2).

    In batch 2 the rows differ in image (seed, size) and question length, so row 1 is left-padded.
    """
    _check_family(family)
    if batch not in (1, 2):
        raise ValueError(f"batch must be 1 or 2, got {batch}")
    sizes = _IMAGE_SIZES[family][:batch]
    images = [_make_image(width, height, seed + row) for row, (width, height) in enumerate(sizes)]
    texts = [_prompt(family, question) for question in _QUESTIONS[:batch]]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def row_inputs(family: str, batch_inputs: BatchFeature, row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of a batch input as a standalone batch-1 input, with its left padding removed.

    Each row must hold exactly one image, as ``make_inputs`` builds them.
    """
    _check_family(family)
    attention_mask = batch_inputs["attention_mask"]
    n_pad = int((attention_mask[row] == 0).sum())
    if not bool(attention_mask[row, n_pad:].all()):
        raise ValueError("row_inputs expects left padding")
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in batch_inputs:
            out[key] = batch_inputs[key][row : row + 1, n_pad:]
    if family in _QWEN_PROCESSORS:
        grid = batch_inputs["image_grid_thw"]
        bounds = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()
        out["pixel_values"] = batch_inputs["pixel_values"][bounds[row] : bounds[row + 1]]
        out["image_grid_thw"] = grid[row : row + 1]
    else:
        out["pixel_values"] = batch_inputs["pixel_values"][row : row + 1]
        if "image_sizes" in batch_inputs:
            out["image_sizes"] = batch_inputs["image_sizes"][row : row + 1]
    return out


def greedy(model: PreTrainedModel, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Greedy-generate exactly `new_tokens`: (new tokens [B, T], per-step logits [B, T, V], the cache)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1), cache_from_output(out)
