"""Idefics3 and SmolVLM: sub-images and the global image are one pool; the layout tokens between them stay."""

import pytest
import torch

import tiny_vlms
import tuner
from tuner.models.families.idefics3 import LAYOUT_TOKENS, TINY_IMAGE_SEQ_LEN

FAMILIES = ("idefics3", "smolvlm")


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_images_are_one_pool_and_layout_tokens_are_kept(family, loaded):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    real = inputs["pixel_attention_mask"].flatten(2).any(-1)  # [B, sub-images]: False on batch padding
    assert not bool(inputs["pixel_values"][0, ~real[0]].any())  # padding sub-images are zeros, dropped
    assert real.sum(1).tolist() == [3, 5]  # 1x2 + global, 2x2 + global
    layout_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(LAYOUT_TOKENS[:1] + LAYOUT_TOKENS[3:]))
    layout = torch.isin(inputs["input_ids"], layout_ids)
    with tuner.apply_pruning(model, tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.3)) as handle, \
            torch.no_grad():
        model(**inputs)
    stats = handle.requests[0]
    assert stats.n_vision == [int(n) * TINY_IMAGE_SEQ_LEN for n in real.sum(1)]
    assert stats.n_kept_vision == [round(0.3 * n) for n in stats.n_vision]
    for row in range(2):  # every <fake_token_around_image>, <row_i_col_j> and <global-img> survives
        layout_positions = layout[row].nonzero().squeeze(1)
        assert len(layout_positions) == 2 * int(real[row].sum()) + 1
        assert bool(torch.isin(layout_positions, handle.last_kept[row]).all())

