"""A stage at K = 0 prunes before the language model: the engine's properties hold there as at K >= 1
(docs/design/DART.md §6).

At K = 0 every layer caches only the kept tokens, so decoding must continue at the ORIGINAL sequence length,
not at the cache's: the decode tests below would fail with positions taken from the shortened cache.
"""

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader, bundled_methods
from tuner.config import check_layer
from tuner.pruning import get_method_class
from tuner.search.params import refuses_layer_0

ATTN = ("sdpa", "eager")
NEW_TOKENS = 4
ATOL = 1e-4
# Every shipped method that can prune before the language model with its default options on every family
# (visionzip reads a vision tower that only some families map; tests/test_visionzip.py covers it at K = 0).
EMBEDDING_METHODS = tuple(m for m in bundled_methods() if m != "keep_all" and not refuses_layer_0(m)
                          and not get_method_class(m).needs.vision_saliency)


def config(method: str, **kwargs) -> tuner.PruningConfig:
    if method not in ("keep_all", "test_fixed") and "budget" not in kwargs:
        kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method=method, layer=0, **kwargs)


def greedy(model, inputs):
    return tiny_vlms.greedy(model, inputs, NEW_TOKENS)


def fixed_config(model, inputs) -> tuner.PruningConfig:
    """K = 0, keeping the vision tokens `random` keeps at 30%: the same set on every call (prompt + tokens)."""
    with tuner.apply_pruning(model, config("random")) as handle, torch.no_grad():
        model(**inputs)
    kept = tiny_vlms.kept_vision(handle, tiny_vlms.vision_mask(model, inputs), 0)
    return config("test_fixed", options={"positions": [kept.tolist()]})


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("cfg", [dict(method="keep_all"), dict(method="random", keep_ratio=1.0)], ids=str)
def test_keeping_everything_at_k0_equals_unhooked_model(family, attn, cfg, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    ref_tokens, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, config(**cfg)):
        tokens, logits, _ = greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_k0_prefill_equals_every_layer_run_by_hand_on_the_kept_embeddings(family, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    text_kwargs, embeddings = tiny_vlms.unhooked_forward(model, inputs, layer=0)
    with tuner.apply_pruning(model, config("random")) as handle, torch.no_grad():
        pruned = model(**inputs).logits
    kept = handle.last_kept[0]
    assert kept.numel() < inputs["input_ids"].shape[1]
    text_model = model.get_decoder()
    hidden = tiny_vlms.hand_run_layers(model, inputs, embeddings[:, kept], kept, range(len(text_model.layers)),
                                       text_kwargs)
    with torch.no_grad():
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_k0_generate_caches_only_kept_tokens_in_every_layer(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    _, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, config("random")) as handle:
        _, logits, cache = greedy(model, inputs)
    assert (logits[:, 0] - ref_logits[:, 0]).abs().max() > 1e-3
    stats = handle.requests[0]
    assert stats.n_kept_vision == [max(1, round(0.3 * n)) for n in stats.n_vision]
    lengths = {cache.get_seq_length(i) for i in range(len(model.get_decoder().layers))}
    assert lengths == {max(stats.n_kept) + NEW_TOKENS - 1}


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_k0_cached_decode_equals_no_cache_recompute(family, attn, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    with tuner.apply_pruning(model, fixed_config(model, inputs)):
        tokens, cached_logits, _ = greedy(model, inputs)
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_k0_plain_decode_calls_continue_at_the_original_length(family, loaded: Loader):
    """A hand-written decode loop gives neither positions nor a mask: the model would number new tokens from the
    pruned cache's length; the hooks must give them their places in the full sequence."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    with tuner.apply_pruning(model, fixed_config(model, inputs)), torch.no_grad():
        tokens, _, _ = greedy(model, inputs)
        out = model(**inputs, use_cache=True)
        cache, step_logits = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits[:, -1]]
        for step in range(NEW_TOKENS - 1):
            out = model(input_ids=tokens[:, step:step + 1], cache=cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, torch.stack(step_logits, 1), ATOL)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_k0_left_padded_batch_equals_rows_alone(family, attn, method, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    tiny_vlms.assert_batch_equals_rows_alone(model, family, inputs, config(method), NEW_TOKENS, ATOL)


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_removing_k0_hooks_restores_the_model_exactly(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    with torch.no_grad():
        before = model(**inputs).logits
        with tuner.apply_pruning(model, config("random")):
            model(**inputs)
        after = model(**inputs).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("method", ("fastv", "window_fastv", "dart"))
def test_methods_that_read_layer_k_minus_1_are_refused_at_k0(method):
    with pytest.raises(ValueError, match=f"method '{method}' reads layer K-1's keys or attention"):
        tuner.PruningConfig(method=method, layer=0, keep_ratio=0.5)


def test_a_later_stage_after_k0_may_read_attention():
    cfg = tuner.PruningConfig(method="random", layer=0, keep_ratio=0.5,
                              stages=[{"layer": 2, "keep_ratio": 0.5, "method": "fastv"}])
    assert cfg.layers == (0, 2)
    check_layer(0, 4)
    with pytest.raises(ValueError, match="K must be in 0..3"):
        check_layer(4, 4)


def test_stack_puts_a_k0_stage_under_a_schedule_without_letting_it_inherit():
    after = tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.5, options={"alpha": 0.5},
                                stages=[{"layer": 3, "keep_ratio": 0.5}])
    stacked = tuner.config.stack(tuner.PruningConfig(method="random", layer=0, keep_ratio=0.5, seed=3),
                                 after)
    assert tuner.config.schedule_text(stacked) == "random@0:0.5>fastv@2:0.5>3:0.5"
    assert [c.method for c in stacked.stage_configs()] == ["random", "fastv", "fastv"]
    assert stacked.stage_config(2).options == {"alpha": 0.5}
    assert stacked.seed == after.seed
    with pytest.raises(ValueError, match="stage layers must increase"):
        tuner.config.stack(after, tuner.PruningConfig(method="random", layer=2, keep_ratio=0.5))


@pytest.mark.parametrize("family", ("llava", "qwen2_vl", "gemma3"))
def test_stacked_k0_and_in_lm_stages_keep_exact_counts_at_original_positions(family, loaded: Loader):
    """random keeps half at K = 0, then DART keeps a quarter of those at K = 2: counts and positions compose."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision = tiny_vlms.vision_mask(model, inputs)
    cfg = tuner.config.stack(config("random", keep_ratio=0.5),
                             tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.25))
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.requests[0]
    first = [max(1, round(0.5 * n)) for n in stats.n_vision]
    assert stats.stage_kept_vision == [first, [max(1, round(0.25 * n)) for n in first]]
    for row in range(2):
        outer, inner = handle.last_stage_kept[0][row], handle.last_stage_kept[1][row]
        assert bool(torch.isin(inner, outer).all()) and torch.equal(inner, inner.sort().values)
        assert torch.equal(outer[~vision[row, outer]], inner[~vision[row, inner]])  # every text token stays
        assert int(vision[row, inner].sum()) == stats.stage_kept_vision[1][row]


def test_a_later_sparsevlm_stage_reads_the_whole_prompt_after_a_k0_stage_pruned_it(loaded: Loader):
    """Layer 0's input is noted before the K = 0 stage gathers it, so SparseVLM's raters see the whole prompt."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    cfg = tuner.config.stack(config("random", keep_ratio=0.5),
                             tuner.PruningConfig(method="sparsevlm", layer=2, keep_ratio=0.5))
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
    first = max(1, round(0.5 * handle.requests[0].n_vision[0]))
    assert handle.requests[0].stage_kept_vision == [[first], [max(1, round(0.5 * first))]]
    with pytest.raises(ValueError, match="method 'sparsevlm' reads layer K-1's keys or attention"):
        tuner.PruningConfig(method="sparsevlm", layer=0, keep_ratio=0.5)
