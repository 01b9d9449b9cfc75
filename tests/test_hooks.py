"""Properties the hook mechanics must hold on every family and attention implementation (docs/design/DART.md §6)."""

import sys

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader, bundled_methods
from tuner.models.compat import positions_from_mask
from tuner.models.families import adapter_for
from tuner.pruning import get_method_class
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.dart import dart_select

ATTN = ("sdpa", "eager")
K = 2
NEW_TOKENS = 4
ATOL = 1e-4
# Every shipped method that removes tokens (keep_all keeps them all), a new one included; those that rank by the
# vision tower's attention (visionzip: not every tiny family maps it) have their own tests.
PRUNING_METHODS = tuple(m for m in bundled_methods()
                        if get_method_class(m).needs_amount and not get_method_class(m).needs.vision_saliency)


def config(method: str, **kwargs) -> tuner.PruningConfig:
    if method not in ("keep_all", "test_fixed") and "budget" not in kwargs:
        kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method=method, layer=K, **kwargs)


def greedy(model, inputs):
    return tiny_vlms.greedy(model, inputs, NEW_TOKENS)


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("cfg", [dict(method="keep_all"), dict(method="dart", keep_ratio=1.0),
                                 dict(method="window_fastv", keep_ratio=1.0)], ids=str)
def test_keeping_everything_equals_unhooked_model(family, attn, batch, cfg, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=batch)
    ref_tokens, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, config(**cfg)) as handle:
        tokens, logits, _ = greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert handle.requests[0].n_kept_vision == handle.requests[0].n_vision


# Every method on every family's left-padded batch under sdpa; DART, whose key capture differs most between
# implementations, also at batch 1 and under eager. (The full product would triple this test's run time
# without exercising another code path: the gather does not depend on the method.)
_GENERATE_CASES = [(method, "sdpa", 2) for method in PRUNING_METHODS] + [
    ("dart", "sdpa", 1), ("dart", "eager", 1), ("dart", "eager", 2)]


@pytest.mark.parametrize("method, attn, batch", _GENERATE_CASES)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_pruned_generate_changes_logits_and_shortens_cache(family, attn, batch, method, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=batch)
    _, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, config(method)) as handle:
        tokens, logits, cache = greedy(model, inputs)
    assert tokens.shape == (batch, NEW_TOKENS)
    assert (logits[:, 0] - ref_logits[:, 0]).abs().max() > 1e-3  # a hook that does nothing fails here
    stats = handle.requests[0]
    assert len(handle.requests) == 1  # one pruning event per generate call, in the prefill only
    if method != "avgpool":
        assert stats.n_kept_vision == [max(1, round(0.3 * n)) for n in stats.n_vision]
    assert all(k < n for k, n in zip(stats.n_kept_vision, stats.n_vision))
    prompt_length = inputs["input_ids"].shape[1]
    width = max(stats.n_kept)
    lengths = [cache.get_seq_length(i) for i in range(len(model.get_decoder().layers))]
    assert lengths == [prompt_length + NEW_TOKENS - 1 if i < K else width + NEW_TOKENS - 1
                       for i in range(len(lengths))]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_pruned_prefill_equals_manual_recomputation(family, attn, loaded: Loader):
    """Layers K.. run by hand on the gathered states, rotary from gathered position ids, a fresh mask."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    text_kwargs, hidden = tiny_vlms.unhooked_forward(model, inputs, layer=K)
    with tuner.apply_pruning(model, config("random")) as handle, torch.no_grad():
        pruned = model(**inputs).logits
    kept = handle.last_kept[0]
    assert kept.numel() < inputs["input_ids"].shape[1]
    text_model = model.get_decoder()
    hidden = tiny_vlms.hand_run_layers(model, inputs, hidden[:, kept], kept, range(K, len(text_model.layers)),
                                       text_kwargs)
    with torch.no_grad():
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_cached_decode_equals_no_cache_recompute(family, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    vision = tiny_vlms.vision_mask(model, inputs)
    with tuner.apply_pruning(model, config("dart")) as handle, torch.no_grad():
        model(**inputs)
    fixed = config("test_fixed", options={"positions": [tiny_vlms.kept_vision(handle, vision, 0).tolist()]})
    with tuner.apply_pruning(model, fixed) as handle:
        tokens, cached_logits, _ = greedy(model, inputs)
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
    assert all(r.n_kept_vision == handle.requests[0].n_kept_vision for r in handle.requests)


# Every method under sdpa; the four whose scores read the captured keys or attention also under eager.
_PADDING_CASES = [(method, attn) for method in PRUNING_METHODS for attn in ATTN
                  if attn == "sdpa" or method in ("dart", "random", "fastv", "window_fastv")]


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("method, attn", _PADDING_CASES)
def test_left_padded_batch_equals_rows_alone(family, attn, method, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    handle, _ = tiny_vlms.assert_batch_equals_rows_alone(model, family, inputs, config(method), NEW_TOKENS, ATOL)
    stats = handle.requests[0]
    assert stats.n_kept[0] != stats.n_kept[1]  # rows keep different counts: the short one is re-padded


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("method", ("dart", "fastv"))
def test_plain_forward_left_padded_batch_equals_rows_alone(family, attn, method, loaded: Loader):
    """`model(**inputs)` without position_ids: padding must not shift the positions that rank DART's pivots."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    assert not bool(inputs["attention_mask"].all())  # row 1 is left-padded
    vision = tiny_vlms.vision_mask(model, inputs)
    with tuner.apply_pruning(model, config(method)) as handle, torch.no_grad():
        batch_logits = model(**inputs).logits[:, -1]
    for row in range(2):
        alone = tiny_vlms.row_inputs(family, inputs, row)
        with tuner.apply_pruning(model, config(method)) as row_handle, torch.no_grad():
            row_logits = model(**alone).logits[:, -1]
        padding = int((inputs["attention_mask"][row] == 0).sum())
        assert torch.equal(tiny_vlms.kept_vision(handle, vision, row) - padding,
                           tiny_vlms.kept_vision(row_handle, tiny_vlms.vision_mask(model, alone), 0))
        torch.testing.assert_close(row_logits[0], batch_logits[row], rtol=0, atol=ATOL)


def _reference_states(model, inputs):
    """Unhooked run: layer K-1 output and its post-RoPE keys, recomputed from k_proj and the rotary tables.

    Attention that normalises its keys before RoPE (`k_norm`: Qwen3, Gemma 3) is read after the norm.
    """
    text_model = model.get_decoder()
    attention = text_model.layers[K - 1].self_attn
    seen = {}
    hooks = [
        attention.k_proj.register_forward_hook(lambda m, a, out: seen.update(k=out)),
        text_model.layers[K - 1].register_forward_pre_hook(
            lambda m, a, kw: seen.update(rotary=kw["position_embeddings"]), with_kwargs=True),
        text_model.layers[K].register_forward_pre_hook(
            lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"]), with_kwargs=True),
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    batch, length = seen["k"].shape[:2]
    keys = seen["k"].reshape(batch, length, -1, attention.head_dim).transpose(1, 2)
    if getattr(attention, "k_norm", None) is not None:  # per-head key norm (over head_dim) before RoPE
        keys = attention.k_norm(keys)
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    keys = rotate(keys, keys, *seen["rotary"])[1]
    return seen["hidden"], keys.transpose(1, 2).reshape(batch, length, -1)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_dart_select_on_unhooked_states_equals_hooked_selection(family, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    reference_inputs = dict(inputs)
    if adapter_for(model).positions_ignore_padding:  # the hooks number each row from its first real token
        reference_inputs["position_ids"] = positions_from_mask(inputs["attention_mask"], inputs["input_ids"].shape[1])
    hidden, keys = _reference_states(model, reference_inputs)
    vision = tiny_vlms.vision_mask(model, inputs)
    cfg = config("dart")
    with torch.no_grad():
        expected = dart_select(model.get_decoder().norm(hidden), keys, vision,
                               budget=[cfg.budget_for(int(n)) for n in vision.sum(1)],
                               attention_mask=inputs["attention_mask"])
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
    for row in range(2):
        assert torch.equal(tiny_vlms.kept_vision(handle, vision, row), expected[row])


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_capture_matches_eager_attention_and_keys(family, loaded: Loader):
    """Layer K-1 capture on an sdpa model equals eager attention weights; keys equal k_proj + RoPE."""
    eager_model, processor = loaded(family, "eager")
    sdpa_model, _ = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    with torch.no_grad():
        weights = eager_model(**inputs, output_attentions=True).attentions[K - 1][:, :, -1, :]
    _, keys = _reference_states(sdpa_model, inputs)
    capture = AttentionCapture(sdpa_model.get_decoder().layers[K - 1].self_attn, keys=True, last_row_attention=True)
    try:
        with torch.no_grad():
            sdpa_model(**inputs)
        torch.testing.assert_close(capture.last_row_attention, weights, rtol=0, atol=1e-5)
        torch.testing.assert_close(capture.take_keys(), keys, rtol=0, atol=1e-5)
    finally:
        capture.remove()
    assert sdpa_model.get_decoder().layers[K - 1].self_attn.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_removing_hooks_restores_the_model_exactly(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    layers = model.get_decoder().layers
    before_config = layers[K - 1].self_attn.config
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).logits
    handle = tuner.apply_pruning(model, config("fastv"))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(RuntimeError, match="boom"), tuner.apply_pruning(model, config("dart")):
        raise RuntimeError("boom")  # an exception inside the block still removes the hooks
    assert not handle.active
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert layers[K - 1].self_attn.config is before_config
    assert not hasattr(layers[K - 1].self_attn, "_dart_tuner_capture")
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ("llava", "qwen2_vl"))
def test_static_cache_and_beam_search_agree_with_dynamic_cache(family, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    with tuner.apply_pruning(model, config("dart")) as handle:
        tokens, logits, _ = greedy(model, inputs)
        with torch.no_grad():
            static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, cache_implementation="static", output_logits=True,
                                    return_dict_in_generate=True)
            beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, num_beams=2)
    assert torch.equal(static.sequences[:, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(torch.stack(static.logits, 1), logits, rtol=0, atol=ATOL)
    assert beams.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
    beam_stats = handle.requests[-1]  # beams are expanded before the prefill: each copy keeps its prompt's set
    assert beam_stats.n_kept_vision == [n for n in handle.requests[0].n_kept_vision for _ in range(2)]
