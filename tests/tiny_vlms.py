"""Tiny random-weight vision-language models of every registered family, built offline for tests.

Nothing is downloaded: the tokenizer is a BPE trained on a few sentences, the configs are written here and the
weights are random. Each family is saved with ``save_pretrained`` and reloaded through the same
``from_pretrained`` calls that real checkpoints go through.
"""

from __future__ import annotations

import inspect
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
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
)

from tuner.models.compat import cache_from_output
from tuner.models.families import Family, PrunedPrefill, adapter_for, family_names, get_family, tiny
from tuner.pruning import PruningMethod, Selection, SelectionContext, apply_pruning, register_method

# Test models by name: every registered family (its `Family.tiny` model), plus variants below.
# "llava_local": LLaVA-1.5 over a Qwen2 text model whose layers alternate sliding-window and full attention
# (the embedded model's text model has sliding-window layers too).
VARIANTS = {"llava_local": "llava"}
FAMILIES = (*family_names(), *VARIANTS)

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

_QUESTIONS = (
    "What is shown in this image? Describe the colours and shapes.",
    "Describe it.",
)


def family_of(name: str) -> Family:
    """The registered family behind a test model name (a family or a variant of one)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    return get_family(VARIANTS.get(name, name))


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


# Sliding window of the "llava_local" test model: far shorter than its 64 image tokens, so it really limits.
_LOCAL_WINDOW = 8


def _build(name: str, tokenizer: PreTrainedTokenizerFast, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The family's tiny model, or a variant of it."""
    if name == "llava_local":  # pruning at K = 2 meets both layer kinds before and after K
        text = Qwen2Config(**tiny.text_sizes(tokenizer, layers), use_sliding_window=True, sliding_window=_LOCAL_WINDOW,
                           layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
        return get_family("llava").tiny(tokenizer, layers, text_config=text)
    return family_of(name).tiny(tokenizer, layers)


def build_and_save(family: str, path: str | Path, *, text_layers: int = 4, seed: int = 0) -> None:
    """Build a seeded tiny model of ``family`` and its processor, and save both under ``path``.

    Qwen processors are saved as their tokenizer and image processor, the layout of a real checkpoint minus its
    video processor config; saving the test-only processor class by name would make ``AutoProcessor`` silently
    return a bare tokenizer. ``load`` rebuilds the processor.
    """
    spec = family_of(family)
    tokenizer = _make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _build(family, tokenizer, text_layers)
    model.save_pretrained(path)
    spec.save_processor(processor, path)


def load(family: str, path: str | Path, *, attn_implementation: str = "sdpa",
         dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Reload a saved tiny model (eval mode) and its processor (left padding) through ``from_pretrained``."""
    spec = family_of(family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    processor = (spec.image_only_processor or AutoProcessor).from_pretrained(path)
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
    """One-image user turn in the family's own format, ending where the assistant's answer starts."""
    return family_of(family).fallback_prompt(question, 1)


def make_inputs(family: str, processor: ProcessorMixin, *, batch: int = 1, seed: int = 0) -> BatchFeature:
    """Processor output for one image-question pair (batch 1) or two with different lengths (batch 2).

    In batch 2 the rows differ in image (seed, size) and question length, so row 1 is left-padded.
    """
    if batch not in (1, 2):
        raise ValueError(f"batch must be 1 or 2, got {batch}")
    sizes = family_of(family).tiny_image_sizes[:batch]
    images = [_make_image(width, height, seed + row) for row, (width, height) in enumerate(sizes)]
    texts = [_prompt(family, question) for question in _QUESTIONS[:batch]]
    return processor(images=family_of(family).processor_images([[image] for image in images]), text=texts,
                     return_tensors="pt", padding=True)


def row_inputs(family: str, batch_inputs: BatchFeature, row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of a batch input as a standalone batch-1 input, with its left padding removed.

    Each row must hold exactly one image, as ``make_inputs`` builds them.
    """
    spec = family_of(family)
    attention_mask = batch_inputs["attention_mask"]
    n_pad = int((attention_mask[row] == 0).sum())
    if not bool(attention_mask[row, n_pad:].all()):
        raise ValueError("row_inputs expects left padding")
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in batch_inputs:
            out[key] = batch_inputs[key][row : row + 1, n_pad:]
    out.update(spec.row_images(batch_inputs, row))
    return out


def greedy(model: PreTrainedModel, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Greedy-generate exactly `new_tokens`: (new tokens [B, T], per-step logits [B, T, V], the cache)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1), cache_from_output(out)


def vision_mask(model: PreTrainedModel, inputs: dict) -> torch.Tensor:
    """[B, N] True on the prompt's image (and video) tokens, padding excluded."""
    ids = [model.config.image_token_id] + ([model.config.video_token_id]
                                           if getattr(model.config, "video_token_id", None) is not None else [])
    return torch.isin(inputs["input_ids"], torch.tensor(ids)) & inputs["attention_mask"].bool()


def kept_vision(handle: Any, vision: torch.Tensor, row: int) -> torch.Tensor:
    """The vision positions the last stage of `handle`'s last prefill kept in batch row `row`."""
    kept = handle.last_kept[row]
    return kept[vision[row, kept]]


def assert_batch_equals_rows_alone(model: PreTrainedModel, family: str, inputs: dict, config: Any, new_tokens: int,
                                   atol: float) -> tuple[Any, torch.Tensor]:
    """Greedy generation on the left-padded batch `inputs` under `config` equals each row generated alone: the
    same kept vision tokens (shifted by the row's padding), tokens and logits. Returns the batch's handle and
    logits, for a test's further checks."""
    vision = vision_mask(model, inputs)
    with apply_pruning(model, config) as handle:
        batch_tokens, batch_logits, _ = greedy(model, inputs, new_tokens)
    for row in range(inputs["input_ids"].shape[0]):
        alone = row_inputs(family, inputs, row)
        with apply_pruning(model, config) as row_handle:
            tokens, logits, _ = greedy(model, alone, new_tokens)
        padding = int((inputs["attention_mask"][row] == 0).sum())
        assert torch.equal(kept_vision(handle, vision, row) - padding,
                           kept_vision(row_handle, vision_mask(model, alone), 0))
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=atol)
    return handle, batch_logits


@register_method("test_fixed")
class FixedSelection(PruningMethod):
    """Test-only method keeping given vision positions, so cached and uncached runs keep the same set."""

    needs_amount = False
    option_defaults = {"positions": None}

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection([torch.tensor(p, dtype=torch.long, device=ctx.hidden_states.device)
                          for p in self.options["positions"]])


def unhooked_forward(model: PreTrainedModel, inputs: dict, layer: int | None = None,
                     **forward_kwargs: Any) -> tuple[dict, torch.Tensor | None]:
    """One forward pass: the keyword arguments the text model got, and the hidden states entering decoder layer
    `layer` (None when no layer is asked for)."""
    text_model = model.get_decoder()
    seen: dict[str, Any] = {}
    hooks = [text_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kwargs=kw), with_kwargs=True)]
    if layer is not None:
        hooks.append(text_model.layers[layer].register_forward_pre_hook(
            lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"]), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, **forward_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["kwargs"], seen.get("hidden")


def hand_run_layers(model: PreTrainedModel, inputs: dict, hidden: torch.Tensor, kept: torch.Tensor,
                    layers: range, text_kwargs: dict) -> torch.Tensor:
    """Decoder `layers` run by hand on `hidden`, row 0's states at its original positions `kept` (batch 1).

    Rotary from the text model's position ids at `kept` (per layer type where the model has several: Gemma 3),
    a fresh mask with the family's per-token state at `kept` (Gemma 3's image blocks), and the family's own
    step after each layer (Qwen3-VL's DeepStack); `text_kwargs` is what the text model got in an unhooked run.
    """
    text_model = model.get_decoder()
    spec = adapter_for(model).spec
    n_tokens = inputs["input_ids"].shape[1]
    positions = text_kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(n_tokens)[None]
    # Qwen M-RoPE: [3 or 4, B, N]; the last three rows are t/h/w.
    positions = positions[-3:][:, :, kept] if positions.dim() == 3 else positions[:, kept]
    state = spec.prompt_state(dict(inputs), inputs["input_ids"])
    kept_state = None if state is None else spec.gather_state(state, PrunedPrefill(
        gather_index=kept[None], valid=torch.ones(1, kept.numel(), dtype=torch.bool), length=n_tokens))
    layer_types = getattr(text_model.config, "layer_types", None) or ["full_attention"] * len(text_model.layers)
    per_type = "layer_type" in inspect.signature(text_model.rotary_emb.forward).parameters
    with torch.no_grad():
        for index in layers:
            kind = layer_types[index]
            rotary = text_model.rotary_emb(hidden, positions, **({"layer_type": kind} if per_type else {}))
            mask = spec.layer_mask(kind, config=text_model.config, hidden=hidden, mask_2d=None, cache=None,
                                   layer_idx=0, kept_state=kept_state)
            hidden = text_model.layers[index](hidden, attention_mask=mask, position_embeddings=rotary,
                                              position_ids=None)
            hidden = spec.reference_after_layer(text_model, index, hidden, text_kwargs, kept)
    return hidden


def assert_cached_decode_equals_recompute(model: PreTrainedModel, inputs: dict, tokens: torch.Tensor,
                                          cached_logits: torch.Tensor, atol: float) -> None:
    """Each greedy step's logits (batch 1, from the cache) equal a no-cache forward of the prompt plus the tokens
    generated before that step."""
    prompt_length = inputs["input_ids"].shape[1]
    sequence = torch.cat([inputs["input_ids"], tokens], 1)
    for step in range(tokens.shape[1]):
        recompute = dict(inputs, input_ids=sequence[:, :prompt_length + step],
                         attention_mask=torch.ones(1, prompt_length + step, dtype=torch.long))
        if "mm_token_type_ids" in inputs:
            recompute["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, step))
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None  # Qwen caches M-RoPE offsets between calls
        with torch.no_grad():
            full = model(**recompute, use_cache=False).logits[0, -1]
        torch.testing.assert_close(full, cached_logits[0, step], rtol=0, atol=atol)
