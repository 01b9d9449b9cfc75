"""Qwen3-VL and Qwen3-VL-MoE: DeepStack features follow the kept tokens when pruning at or before their layers.

The tiny models have three DeepStack entries (added after decoder layers 0, 1 and 2) and 4 decoder layers, so
K = 1 and 2 prune inside the DeepStack layers and K = 3 after them. The property tests of test_hooks.py run
at K = 2; here K = 1, 2 and 3 are checked against a hand-run that adds the DeepStack features itself.
"""

import pytest
import torch
from PIL import Image

import tiny_vlms
import tuner
from conftest import Loader
from tuner.evaluation.inputs import build_inputs
from tuner.models import load_model
from tuner.models.compat import build_mask
from tuner.models.cost import kv_cache_bytes, prefill_flops
from tuner.models.families import PrunedPrefill, adapter_for, get_family
from tuner.models.families.qwen3_vl import kept_deepstack

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
LAYERS = (1, 2, 3)
NEW_TOKENS = 3
ATOL = 1e-4


def _config(method: str, layer: int, **kwargs) -> tuner.PruningConfig:
    if method != "test_fixed":
        kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method=method, layer=layer, **kwargs)


def _vision(model, inputs) -> torch.Tensor:
    return (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prefill_equals_hand_run_with_deepstack_at_kept_positions(family, layer, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    text_model = model.get_decoder()
    text_kwargs, layer_input = tiny_vlms.unhooked_forward(model, inputs, layer=layer)
    with tuner.apply_pruning(model, _config("random", layer)) as handle, torch.no_grad():
        pruned = model(**inputs).logits
    kept = handle.last_kept[0].tolist()
    assert len(kept) < inputs["input_ids"].shape[1]

    deepstack = text_kwargs["deepstack_visual_embeds"]
    assert len(deepstack) == len(model.config.vision_config.deepstack_visual_indexes) == 3
    vision_positions = text_kwargs["visual_pos_masks"][0].nonzero()[:, 0].tolist()
    assert vision_positions == _vision(model, inputs)[0].nonzero()[:, 0].tolist()
    slots = [slot for slot, position in enumerate(kept) if position in vision_positions]
    rows = [vision_positions.index(kept[slot]) for slot in slots]
    assert 0 < len(rows) < len(vision_positions)
    with torch.no_grad():
        hidden = layer_input[:, kept]
        positions = text_kwargs["position_ids"][-3:][:, :, kept]  # (t, h, w) of the kept tokens
        rotary = text_model.rotary_emb(hidden, positions)
        mask = build_mask("full_attention", config=text_model.config, inputs_embeds=hidden, attention_mask=None,
                          cache=None, layer_idx=0)
        for index in range(layer, len(text_model.layers)):
            hidden = text_model.layers[index](hidden, attention_mask=mask, position_embeddings=rotary,
                                              position_ids=None)
            if index < len(deepstack):
                feature = deepstack[index][rows]
                assert feature.abs().amax() > 1e-3  # the features really change the kept vision tokens
                hidden[0, slots] += feature
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layer", (1, 3))  # K = 2 runs in test_hooks.py
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_no_cache_recompute(family, layer, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    vision = _vision(model, inputs)
    with tuner.apply_pruning(model, _config("dart", layer)) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.last_kept[0]
    fixed = _config("test_fixed", layer, options={"positions": [kept[vision[0, kept]].tolist()]})
    with tuner.apply_pruning(model, fixed):
        tokens, cached_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)


@pytest.mark.parametrize("layer", (1, 3))  # K = 2 runs in test_hooks.py
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_rows_alone(family, layer, loaded: Loader):
    """Row 1's DeepStack rows follow row 0's 63 in the concatenated features: a per-row rank would be wrong."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision = _vision(model, inputs)
    with tuner.apply_pruning(model, _config("dart", layer)) as handle:
        batch_tokens, batch_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    assert handle.requests[0].n_kept[0] != handle.requests[0].n_kept[1]
    for row in range(2):
        alone = tiny_vlms.row_inputs(family, inputs, row)
        with tuner.apply_pruning(model, _config("dart", layer)) as row_handle:
            tokens, logits, _ = tiny_vlms.greedy(model, alone, NEW_TOKENS)
        padding = int((inputs["attention_mask"][row] == 0).sum())
        kept, row_kept = handle.last_kept[row], row_handle.last_kept[0]
        assert torch.equal(kept[vision[row, kept]] - padding, row_kept[_vision(model, alone)[0, row_kept]])
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=ATOL)


def test_kept_deepstack_rows_follow_the_kept_vision_positions_in_row_major_order():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # 3 + 4 vision rows
    features = torch.arange(7.0)[:, None].expand(7, 2)
    # Row 0 keeps positions 0, 2, 4, 5; row 1 keeps 3, 5 (left-padded to 4 slots).
    index = torch.tensor([[0, 2, 4, 5], [0, 0, 3, 5]])
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    kept_mask, kept_features = kept_deepstack(mask, features, PrunedPrefill(index, valid, length=6))
    assert kept_mask.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert kept_features[:, 0].tolist() == [1.0, 2.0, 4.0, 6.0]  # vision rows 1, 2 of row 0; 1, 3 of row 1
    with pytest.raises(RuntimeError, match="visual_pos_masks covers 5 positions"):
        kept_deepstack(mask[:, :5], features, PrunedPrefill(index, valid, length=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_deepstack_wrapper_is_removed_with_the_hooks(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    text_model = adapter_for(model).text_model
    handle = tuner.apply_pruning(model, _config("random", 1))
    assert "_deepstack_process" in vars(text_model)
    handle.remove()
    assert "_deepstack_process" not in vars(text_model)
    assert text_model._deepstack_process.__func__ is type(text_model)._deepstack_process


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_and_evaluation_inputs(family, saved_dirs, tmp_path):
    """The real loading path (image-only processor fallback) and the evaluation's prompt building."""
    loaded_model = load_model(saved_dirs[family], device="cpu", dtype="float32")
    assert loaded_model.family == family and loaded_model.adapter.spec is get_family(family)
    image = Image.new("RGB", (200, 150), (90, 30, 200))
    inputs = build_inputs(loaded_model, ["What is it?", "Describe the picture."], [[image], [image]])
    assert "mm_token_type_ids" in inputs and int((inputs["input_ids"] == loaded_model.model.config.image_token_id)
                                                 .sum()) > 0
    with tuner.apply_pruning(loaded_model.model, _config("dart", 2)) as handle:
        tiny_vlms.greedy(loaded_model.model, dict(inputs), 2)
    assert handle.requests[0].n_kept_vision == [_config("dart", 2).budget_for(n) for n in handle.requests[0].n_vision]


def test_moe_cost_counts_the_active_experts():
    config = get_family("qwen3_vl_moe").published_config()
    dims = get_family("qwen3_vl_moe").text_dims(config)
    assert (dims.layers, dims.hidden, dims.intermediate, dims.heads, dims.kv_heads, dims.head_dim) == \
        (48, 2048, 8 * 768, 32, 4, 128)
    n = 1000
    per_layer = (2 * n * 2048 * (2 * 32 * 128 + 2 * 4 * 128) + 2 * 2 * 32 * 128 * n * (n + 1) // 2
                 + 2 * n * 2048 * 8 * 768 * 3)
    assert prefill_flops(dims, n) == 48 * per_layer + 2 * 2048 * 151936
    assert kv_cache_bytes(dims, n, 400, layer=2, dtype=torch.bfloat16) == 2 * 4 * 128 * 2 * (2 * n + 46 * 400)
