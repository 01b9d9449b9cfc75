"""`visionzip`: the vision-tower capture, the dominant / contextual rule, and the engine's properties at K = 0.

Parametrised over the families that map their vision tower's attention onto their vision tokens; every other
family must be refused up front.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import tiny_vlms
import tuner
from conftest import Loader
from tuner.cli import app
from tuner.models.families import adapter_for
from tuner.models.feature_cache import NEEDS_VISION_TOWER, FeatureCache
from tuner.pruning import get_method_class
from tuner.pruning.methods.visionzip import visionzip_select
from tuner.pruning.vision_capture import VisionAttentionCapture

SUPPORTED = tuple(f for f in tiny_vlms.FAMILIES if tiny_vlms.family_of(f).vision_saliency_query is not None)
UNSUPPORTED = tuple(f for f in tiny_vlms.FAMILIES if f not in SUPPORTED)
ATTN = ("sdpa", "eager")
NEW_TOKENS = 4
ATOL = 1e-4


def config(layer: int = 0, **kwargs) -> tuner.PruningConfig:
    if "budget" not in kwargs:
        kwargs.setdefault("keep_ratio", 0.25)
    return tuner.PruningConfig(method="visionzip", layer=layer, **kwargs)


def greedy(model, inputs):
    return tiny_vlms.greedy(model, inputs, NEW_TOKENS)


def image_inputs(inputs) -> dict:
    """The keyword arguments of the inner model's `get_image_features` in a processor output."""
    return {key: inputs[key] for key in ("pixel_values", "image_grid_thw") if key in inputs}


def eager_reference(family: str, inputs, loaded: Loader, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(saliency [B, N], keys [B, N, d]) on the prompt's image tokens, from the EAGER model's own attention weights and
    keys (its eager attention function, recorded for the captured module), put in token order independently of the
    family code: LLaVA drops the CLS column; Qwen averages each 2x2 patch group and takes the order in which the
    model itself lays the merger's outputs (found by matching the last block's merged rows to `pooler_output`)."""
    model, _ = loaded(family, "eager")
    spec = adapter_for(model).spec
    attention = spec.vision_attention(model)
    modeling = sys.modules[type(attention).__module__]
    original, calls = modeling.eager_attention_forward, []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        if module is attention:
            calls.append((key, weights))
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    owner = spec.image_features_owner(model)
    blocks = getattr(getattr(owner, "visual", None), "blocks", None)
    seen = {}
    hook = blocks[-1].register_forward_hook(lambda m, a, out: seen.update(last=out)) if blocks is not None else None
    try:
        with torch.no_grad():
            pooled = owner.get_image_features(**image_inputs(inputs), return_dict=True).pooler_output
    finally:
        monkeypatch.undo()
        if hook is not None:
            hook.remove()
    if spec.vision_saliency_query == "cls":  # one call over all images: [n_images, H, S, S]
        (key, weights), = calls
        saliency, keys = weights[:, :, 0, 1:].mean(1).flatten(), key.mean(1)[:, 1:].flatten(0, 1)
    else:  # one call per image: [1, H, n, n]; patches grouped by the merge unit, then in the merger's order
        saliency = torch.cat([w.mean(2).mean(1).flatten() for _, w in calls])
        keys = torch.cat([k.mean(1).flatten(0, 1) for k, _ in calls])
        unit = model.config.vision_config.spatial_merge_size ** 2
        saliency, keys = saliency.view(-1, unit).mean(1), keys.view(-1, unit, keys.shape[-1]).mean(1)
        with torch.no_grad():
            merged = owner.visual.merger(seen["last"])
        distance, order = torch.cdist(torch.cat(pooled), merged).min(1)
        assert float(distance.max()) < 1e-2 and order.unique().numel() == order.numel()  # cdist rounds
        saliency, keys = saliency[order], keys[order]
    vision = tiny_vlms.vision_mask(model, inputs)
    out_saliency = torch.zeros(vision.shape)
    out_keys = torch.zeros(*vision.shape, keys.shape[-1])
    out_saliency[vision], out_keys[vision] = saliency, keys
    return out_saliency, out_keys


# -- the capture ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", (1024, 7))
@pytest.mark.parametrize("family", SUPPORTED)
def test_captured_vision_attention_under_sdpa_equals_eager_weights(family, chunk, loaded: Loader, monkeypatch):
    """Under sdpa (kept: the tower's output is unchanged), the capture mapped by the family equals the eager
    weights put in token order independently; query blocks of 7 exercise the blocked mean over queries."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    spec = adapter_for(model).spec
    owner = spec.image_features_owner(model)
    with torch.no_grad():
        plain = torch.cat(owner.get_image_features(**image_inputs(inputs), return_dict=True).pooler_output)
    attention = spec.vision_attention(model)
    monkeypatch.setattr("tuner.pruning.vision_capture.QUERY_CHUNK", chunk)
    capture = VisionAttentionCapture(attention, spec.vision_saliency_query, spec.vision_tower(model))
    try:
        assert attention._dart_tuner_inner == "sdpa"  # the tower keeps its kernel
        with torch.no_grad():
            captured = torch.cat(owner.get_image_features(**image_inputs(inputs), return_dict=True).pooler_output)
        run, elapsed_ms = capture.take()
    finally:
        capture.remove()
    assert torch.equal(captured, plain)  # recording changes nothing
    assert elapsed_ms > 0
    saliency, keys = spec.vision_saliency(model.config, run, inputs["input_ids"], tiny_vlms.vision_mask(model, inputs))
    ref_saliency, ref_keys = eager_reference(family, inputs, loaded, monkeypatch)
    torch.testing.assert_close(saliency, ref_saliency, rtol=0, atol=1e-6)
    torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-5)
    assert attention.config is model.config.vision_config  # removed: the shared config is back


# -- the rule --------------------------------------------------------------------------------------------------------
def test_dominant_and_contextual_on_a_hand_worked_row():
    """8 tokens, 3 dominant + 2 contextual, worked by hand.

    Dominant: the 3 largest saliencies, tokens 1, 3, 5. Rest in order: 0, 2, 4, 6, 7; step = 5 // 2 = 2, so the
    targets are rest[0] = 0 and rest[2] = 4. Members: 2 (key along target 0's), 6 (along target 4's) and 7 (equally
    far from both: the first target). States are the token's index: target 0 becomes 0 + mean(2, 7) = 4.5, target 4
    becomes 4 + 6 = 10; each merged token sits at its target's position.
    """
    saliency = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.05, 0.15])
    keys = torch.tensor([[1.0, 0], [5, 5], [2, 1], [5, 5], [0, 1], [5, 5], [0.1, 3], [-1, -1]])
    states = torch.arange(8.0)[:, None].expand(8, 3)
    kept, new_states, merged = visionzip_select(saliency, keys, states, 3, 2)
    assert kept.tolist() == [0, 1, 3, 4, 5]
    assert new_states[:, 0].tolist() == [4.5, 1, 3, 10, 5]
    assert merged


def _literal_visionzip(saliency, keys, states, n_dominant, n_contextual):
    """The rule restated as plain loops over Python numbers: kept index -> state."""
    n = len(saliency)
    dominant = sorted(range(n), key=lambda i: (-saliency[i], i))[:n_dominant]
    rest = [i for i in range(n) if i not in dominant]
    targets = rest[::max(1, len(rest) // n_contextual)][:n_contextual] if n_contextual else []
    members = {t: [] for t in targets}
    unit = [[x / sum(y * y for y in key) ** 0.5 for x in key] for key in keys]
    for i in rest if targets else []:  # no targets: the rest is dropped
        if i in targets:
            continue
        dots = [sum(a * b for a, b in zip(unit[i], unit[t])) for t in targets]
        members[targets[dots.index(max(dots))]].append(i)
    out = {i: list(states[i]) for i in dominant}
    for t in targets:
        joined = members[t]
        mean = [sum(states[j][d] for j in joined) / max(1, len(joined)) for d in range(len(states[t]))]
        out[t] = [s + m for s, m in zip(states[t], mean)]
    return dict(sorted(out.items()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_dominant, n_contextual", [(5, 3), (1, 7), (10, 0), (0, 4), (12, 8)])
def test_rule_equals_a_literal_restatement(seed, n_dominant, n_contextual):
    generator = torch.Generator().manual_seed(seed)
    saliency = torch.rand(20, generator=generator, dtype=torch.float64)
    keys = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    states = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    kept, new_states, _ = visionzip_select(saliency, keys, states, n_dominant, n_contextual)
    expected = _literal_visionzip(saliency.tolist(), keys.tolist(), states.tolist(), n_dominant, n_contextual)
    assert kept.tolist() == list(expected)
    torch.testing.assert_close(new_states, torch.tensor(list(expected.values()), dtype=torch.float32),
                               rtol=0, atol=1e-5)


# -- through the model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SUPPORTED)
def test_merged_states_and_positions_through_the_model_at_k0(family, loaded: Loader, monkeypatch):
    """Expected kept positions and states from eager's own attention, keys and embeddings; every decoder layer run
    by hand on them at the kept ORIGINAL positions (a merged token at its target's) equals the hooked logits."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    text_kwargs, embeddings = tiny_vlms.unhooked_forward(model, inputs, layer=0)
    saliency, keys = eager_reference(family, inputs, loaded, monkeypatch)
    vision = tiny_vlms.vision_mask(model, inputs)[0].nonzero().squeeze(1)
    budget = 16
    local, states, merged = visionzip_select(saliency[0, vision], keys[0, vision], embeddings[0, vision], 13, 3)
    assert merged
    with tuner.apply_pruning(model, config(budget=budget)) as handle, torch.no_grad():
        pruned = model(**inputs).logits
    kept = handle.last_kept[0]
    assert torch.equal(tiny_vlms.kept_vision(handle, tiny_vlms.vision_mask(model, inputs), 0), vision[local])
    hidden = embeddings.clone()
    hidden[0, vision[local]] = states
    text_model = model.get_decoder()
    hidden = tiny_vlms.hand_run_layers(model, inputs, hidden[:, kept], kept, range(len(text_model.layers)),
                                       text_kwargs)
    with torch.no_grad():
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("budget, share, split", [
    (64, None, (54, 10)), (128, None, (108, 20)), (192, None, (162, 30)), (16, None, (13, 3)), (32, 0.25, (24, 8)),
    (5, 0.0, (5, 0)), (6, 0.5, (3, 3))])
def test_the_split_defaults_to_the_papers(budget, share, split):
    options = {} if share is None else {"contextual_share": share}
    method = get_method_class("visionzip")(config(budget=budget, options=options))
    assert method.split(budget) == split


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("amount, share", [
    (dict(budget=64), 10 / 64), (dict(budget=16), 10 / 64), (dict(keep_ratio=0.5), 0.25), (dict(budget=5), 0.0),
    (dict(keep_ratio=0.1), 0.5)], ids=str)
def test_every_row_keeps_exactly_its_budget(family, amount, share, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    cfg = config(options={"contextual_share": share}, **amount)
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.requests[0]
    assert stats.n_kept_vision == [cfg.budget_for(n) for n in stats.n_vision]
    assert [k.numel() for k in handle.last_kept] == stats.n_kept


@pytest.mark.parametrize("options, match", [
    ({"contextual_share": 1.0}, "contextual_share must be a number in \\[0, 1\\), got 1.0"),
    ({"contextual_share": -0.1}, "contextual_share"), ({"contextual_share": "half"}, "contextual_share"),
    ({"contextual_share": True}, "contextual_share"), ({"contextual_share": float("nan")}, "contextual_share"),
    ({"dominant": 54}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as error:
        config(options=options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_families_are_refused_before_any_compute(family, loaded: Loader):
    model, _ = loaded(family, "sdpa")
    name = tiny_vlms.family_of(family).name
    with pytest.raises(ValueError, match=f"^visionzip does not support family {name} yet") as error:
        tuner.apply_pruning(model, config())
    assert "\n" not in str(error.value)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_later_stage_cannot_use_it(loaded: Loader):
    model, _ = loaded("llava", "sdpa")
    cfg = tuner.PruningConfig(method="random", layer=0, keep_ratio=0.5,
                              stages=[{"layer": 2, "keep_ratio": 0.5, "method": "visionzip"}])
    with pytest.raises(ValueError, match="ranks on the vision tower's attention.*first stage only"):
        tuner.apply_pruning(model, cfg)


# -- the engine's properties at K = 0 (and K = 1) ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", (0, 1))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", SUPPORTED)
def test_keep_ratio_one_equals_the_unhooked_model(family, attn, layer, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    ref_tokens, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, config(layer, keep_ratio=1.0)) as handle:
        tokens, logits, _ = greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert handle.requests[0].n_kept_vision == handle.requests[0].n_vision


@pytest.mark.parametrize("layer", (0, 1))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", SUPPORTED)
def test_left_padded_batch_equals_rows_alone(family, attn, layer, loaded: Loader):
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    _, ref_logits, _ = greedy(model, inputs)
    handle, batch_logits = tiny_vlms.assert_batch_equals_rows_alone(model, family, inputs, config(layer), NEW_TOKENS,
                                                                    ATOL)
    assert (batch_logits[:, 0] - ref_logits[:, 0]).abs().max() > 1e-3  # it prunes
    assert len(handle.requests) == 1


@pytest.mark.parametrize("layer", (0, 1))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", SUPPORTED)
def test_cached_decode_equals_no_cache_recompute(family, attn, layer, loaded: Loader):
    """The selection depends on the image alone, so every no-cache recomputation keeps the same tokens."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    with tuner.apply_pruning(model, config(layer)) as handle, torch.no_grad():
        # Random weights may pick the image token, which a recomputation would take for a 65th image placeholder.
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=[model.config.image_token_id])
        tokens, cached_logits = out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
    assert all(r.n_kept_vision == handle.requests[0].n_kept_vision for r in handle.requests)
    kept = handle.requests[0].n_kept[0]
    assert tiny_vlms.cache_from_output(out).get_seq_length(len(model.get_decoder().layers) - 1) == \
        kept + NEW_TOKENS - 1


@pytest.mark.parametrize("family", SUPPORTED)
def test_beam_search_keeps_each_prompts_own_tokens_in_all_its_beams(family, loaded: Loader):
    """generate() runs the tower once per prompt, then repeats each row per beam: every beam keeps its prompt's set."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision = tiny_vlms.vision_mask(model, inputs)
    with tuner.apply_pruning(model, config()) as handle, torch.no_grad():
        model(**inputs)
    with tuner.apply_pruning(model, config()) as beams, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    beam_vision = vision.repeat_interleave(2, dim=0)
    for row in range(4):
        assert torch.equal(tiny_vlms.kept_vision(beams, beam_vision, row),
                           tiny_vlms.kept_vision(handle, vision, row // 2))


@pytest.mark.parametrize("family", SUPPORTED)
def test_removing_the_hooks_restores_the_model_exactly(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    attention = adapter_for(model).spec.vision_attention(model)
    with torch.no_grad():
        before = model(**inputs).logits
        with tuner.apply_pruning(model, config()):
            assert attention.config is not model.config.vision_config
            model(**inputs)
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert attention.config is model.config.vision_config
    assert not hasattr(model.base_model, NEEDS_VISION_TOWER)
    assert not hasattr(attention, "_dart_tuner_capture")


# -- the feature cache -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SUPPORTED)
def test_a_warm_feature_cache_is_bypassed_while_visionzip_runs(family, loaded: Loader):
    """A cached answer would skip the tower and leave nothing to rank by: the cache passes calls through while the
    method is applied (same kept set and logits as without a cache) and serves hits again once it is removed."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    with tuner.apply_pruning(model, config()) as handle:
        _, ref_logits, _ = greedy(model, inputs)
    ref_kept = handle.last_kept
    cache = FeatureCache(64 * 2 ** 20)
    with cache.attach(model, adapter_for(model).spec):
        greedy(model, inputs)  # unpruned: a miss, stored
        with tuner.apply_pruning(model, config()) as handle:
            _, logits, _ = greedy(model, inputs)
        after_pruning = cache.stats()
        greedy(model, inputs)
    assert (after_pruning.hits, after_pruning.misses, after_pruning.bypassed) == (0, 1, 1)
    assert cache.stats().hits == 1
    assert all(torch.equal(a, b) for a, b in zip(handle.last_kept, ref_kept))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", SUPPORTED)
def test_precomputed_features_without_a_tower_run_are_an_error(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = dict(tiny_vlms.make_inputs(family, processor))
    owner = adapter_for(model).spec.image_features_owner(model)
    with torch.no_grad():
        features = owner.get_image_features(**image_inputs(inputs), return_dict=True)
    del inputs["pixel_values"]
    with tuner.apply_pruning(model, config()), torch.no_grad():
        with pytest.raises(RuntimeError, match="the tower did not run for this prefill"):
            model(**inputs, mm_encoder_outputs={"image": features})


# -- the command line --------------------------------------------------------------------------------------------------
def test_eval_without_layer_runs_visionzip_at_k0_and_others_at_their_own_k(saved_dirs, tmp_path):
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(saved_dirs["llava"]), "--task", "dart_shapes", "--method", "visionzip", "--method",
        "random", "--keep-ratio", "0.25", "--limit", "2", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
        "--max-failures", "2", "--device", "cpu", "--json", str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["visionzip 0.25"]["config"]["layer"] == 0 and rows["random 0.25"]["config"]["layer"] == 2
    assert rows["visionzip 0.25"]["cost"]["select_ms"] > 0
