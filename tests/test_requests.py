"""A request is pruned once and never fails when it can run: generate without a cache reuses the prefill's choice,
a mask hiding every vision token passes through unpruned (counted), DART clamps its pivots to a short row; and
greedy selections keep, in a left-padded batch, what each row keeps alone on several image draws."""

import warnings

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader, bundled_methods
from tuner.pruning import get_method_class
from tuner.search.params import refuses_layer_0

NEW_TOKENS = 4
ATOL = 1e-4
K0_METHODS = tuple(m for m in bundled_methods() if m != "keep_all" and not refuses_layer_0(m)
                   and not get_method_class(m).needs_vision_saliency)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("method, layer", [("random", 0), ("random", 2), ("fastv", 2), ("avgpool", 2)])
def test_generate_without_cache_reuses_the_prefill_choice(method, layer, loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    cfg = tuner.PruningConfig(method=method, layer=layer, keep_ratio=0.3)
    with tuner.apply_pruning(model, cfg) as handle:
        cached_tokens, cached_logits = generate(model, inputs)
        cached_kept = [k.clone() for k in handle.last_kept]
        tokens, logits = generate(model, inputs, use_cache=False)
    assert torch.equal(tokens, cached_tokens)
    torch.testing.assert_close(logits, cached_logits, rtol=0, atol=ATOL)
    assert len(handle.requests) == 2  # one per generate call, not one per uncached step
    prompt_length = inputs["input_ids"].shape[1]
    for row in range(2):
        assert torch.equal(handle.last_kept[row][handle.last_kept[row] < prompt_length], cached_kept[row])


def test_a_different_prompt_after_a_request_is_a_new_request(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    other = tiny_vlms.make_inputs("llava", processor, seed=5)  # the same text, another image
    grown = dict(other, input_ids=torch.cat([other["input_ids"], other["input_ids"][:, -1:]], 1),
                 attention_mask=torch.ones(1, other["input_ids"].shape[1] + 1, dtype=torch.long))
    with tuner.apply_pruning(model, tuner.PruningConfig(method="random", keep_ratio=0.3)) as handle, torch.no_grad():
        model(**inputs)
        model(**grown)  # longer and with the same prompt text, but other pixels: not a continuation
    assert len(handle.requests) == 2


def test_a_mask_hiding_every_vision_token_passes_through_unpruned(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    hidden = dict(inputs, attention_mask=inputs["attention_mask"] & ~tiny_vlms.vision_mask(model, inputs))
    with torch.no_grad():
        expected = model(**hidden).logits
    with tuner.apply_pruning(model, tuner.PruningConfig(method="dart", keep_ratio=0.3)) as handle, torch.no_grad():
        logits = model(**hidden).logits
    assert torch.equal(logits, expected)
    (stats,) = handle.requests
    assert not stats.pruned and stats.n_vision == stats.n_kept_vision == [0]
    assert stats.n_tokens == hidden["attention_mask"].sum(1).tolist()


def test_dart_clamps_its_image_pivots_to_a_short_row_and_warns_once(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    n_vision = int(tiny_vlms.vision_mask(model, inputs).sum())
    cfg = tuner.PruningConfig(method="dart", budget=1, options={"n_image_pivots": n_vision + 3})
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs)
        model(**inputs)
    assert [r.n_kept_vision for r in handle.requests] == [[1], [1]]
    messages = [str(w.message) for w in caught if "n_image_pivots" in str(w.message)]
    assert len(messages) == 1 and f"exceeds the {n_vision} vision tokens of batch row 0" in messages[0]


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("family", ("llava_next", "llava_onevision"))
def test_k0_batch_equals_rows_alone_over_image_draws(family, attn, loaded: Loader):
    """LLaVA-NeXT and OneVision repeat one `image_newline` vector per grid row: exact duplicates at K = 0."""
    model, processor = loaded(family, attn)
    for seed in range(5):
        inputs = tiny_vlms.make_inputs(family, processor, batch=2, seed=seed)
        for method in K0_METHODS:
            cfg = tuner.PruningConfig(method=method, layer=0, keep_ratio=0.3)
            tiny_vlms.assert_batch_equals_rows_alone(model, family, inputs, cfg, 1, ATOL)  # the prefill: 1 token
