"""Checks that the tiny test VLMs save, reload and generate, and that ``row_inputs`` reproduces batch rows."""

import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

import tiny_vlms
from conftest import Loader

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
NEW_TOKENS = 3


def image_tokens_per_row(model: PreTrainedModel, inputs: dict) -> list[int]:
    """Number of image placeholder tokens in each row of ``inputs``."""
    return (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_reload_gives_expected_classes(family: str, loaded: Loader) -> None:
    model, processor = loaded(family, "sdpa")
    spec = tiny_vlms.family_of(family)  # the family's class, and the processor transformers maps its type to
    model_class, processor_class = spec.class_names[0], PROCESSOR_MAPPING_NAMES[spec.model_types[0]]
    assert any(cls.__name__ == model_class for cls in type(model).__mro__)
    assert any(cls.__name__ == processor_class for cls in type(processor).__mro__)
    assert not model.training
    assert model.dtype == torch.float32
    assert processor.tokenizer.padding_side == "left"
    text_config = model.config.get_text_config()
    assert text_config.num_hidden_layers == 4
    assert text_config.num_key_value_heads < text_config.num_attention_heads


def test_build_is_seeded(tmp_path: Path, saved_dirs: dict[str, Path]) -> None:
    tiny_vlms.build_and_save("llava", tmp_path / "again", seed=0)
    tiny_vlms.build_and_save("llava", tmp_path / "other", seed=1)
    weights = {name: (path / "model.safetensors").read_bytes()
               for name, path in (("same", tmp_path / "again"), ("other", tmp_path / "other"),
                                  ("saved", saved_dirs["llava"]))}
    assert weights["same"] == weights["saved"]
    assert weights["other"] != weights["saved"]


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_generate(family: str, attn_implementation: str, batch: int, loaded: Loader) -> None:
    model, processor = loaded(family, attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    inputs = tiny_vlms.make_inputs(family, processor, batch=batch)
    assert all(n > 0 for n in image_tokens_per_row(model, inputs))
    tokens, logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    assert tokens.shape == (batch, NEW_TOKENS)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_batch_rows_are_left_padded(family: str, loaded: Loader) -> None:
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    mask = inputs["attention_mask"]
    assert (mask[:, 0] == 0).any()
    assert (mask[:, -1] == 1).all()
    single = tiny_vlms.make_inputs(family, processor, batch=1)
    assert image_tokens_per_row(model, single) == image_tokens_per_row(model, inputs)[:1]
    if not tiny_vlms.family_of(family).fixed_image_tokens:  # the two test images differ in size
        n_image = image_tokens_per_row(model, inputs)
        assert n_image[0] != n_image[1]


def test_llava_image_tokens_form_square_grid(loaded: Loader) -> None:
    model, processor = loaded("llava", "sdpa")
    (n_image,) = image_tokens_per_row(model, tiny_vlms.make_inputs("llava", processor))
    assert n_image >= 36
    assert math.isqrt(n_image) ** 2 == n_image


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_row_inputs_match_batch_rows(family: str, attn_implementation: str, loaded: Loader) -> None:
    model, processor = loaded(family, attn_implementation)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    batch_tokens, batch_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    for row in range(2):
        alone = tiny_vlms.row_inputs(family, inputs, row)
        assert alone["attention_mask"].shape[0] == 1 and bool(alone["attention_mask"].all())
        assert image_tokens_per_row(model, alone) == image_tokens_per_row(model, inputs)[row : row + 1]
        tokens, logits, _ = tiny_vlms.greedy(model, alone, NEW_TOKENS)
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=1e-4)
