"""Multi-stage schedules (PyramidDrop's shape): the engine properties of docs/design/DART.md §6 at every stage, on
every family."""

import re

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.config import Stage, schedule_text
from tuner.models.families import adapter_for
from tuner.pruning import Needs, PruningMethod, Selection, SelectionContext, register_method

ATTN = ("sdpa", "eager")
NEW_TOKENS = 3
ATOL = 1e-4
STAGE_LAYERS = (1, 2, 3)  # the tiny text models have 4 layers; Qwen3-VL's DeepStack adds after layers 0..2


@register_method("test_stride")
class StrideSelection(PruningMethod):
    """Test-only: every `stride`-th vision token of the tokens a stage sees, so a no-cache recomputation of a
    longer sequence keeps the same set; asks for the last row's attention so that every stage layer captures."""

    needs_amount = False
    needs = Needs(last_row_attention=True)
    option_defaults = {"stride": 2}

    def select(self, ctx: SelectionContext) -> Selection:
        assert ctx.last_row_attention.shape[-1] == ctx.hidden_states.shape[1]  # captured at this stage's K - 1
        return Selection([ctx.vision_positions(row)[::self.options["stride"]] for row in range(len(ctx.budgets))])


def schedule(method: str, ratios: tuple[float, ...] = (0.6, 0.6, 0.6), **kwargs) -> tuner.PruningConfig:
    """A config pruning at STAGE_LAYERS with one keep ratio per stage."""
    amount = (lambda r: {}) if method == "test_stride" else (lambda r: {"keep_ratio": r})
    stages = tuple(Stage(layer, **amount(r)) for layer, r in zip(STAGE_LAYERS[1:], ratios[1:]))
    return tuner.PruningConfig(method=method, layer=STAGE_LAYERS[0], stages=stages, **amount(ratios[0]), **kwargs)


def greedy(model, inputs):
    return tiny_vlms.greedy(model, inputs, NEW_TOKENS)


def vision_of(model, inputs) -> torch.Tensor:
    return adapter_for(model).vision_mask(inputs["input_ids"], inputs["attention_mask"].bool())


def test_config_validation_and_round_trip():
    config = tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.5,
                                 stages=[{"layer": 4, "keep_ratio": 0.5}, Stage(6, budget=8, method="random")])
    assert config.layers == (2, 4, 6)
    assert schedule_text(config) == "fastv@2:0.5>4:0.5>random@6:8t"
    assert tuner.PruningConfig(**config.to_dict()) == config
    assert "stages" not in tuner.PruningConfig(method="dart", keep_ratio=0.3).to_dict()  # one stage: as before
    assert config.stage_config(1).options == {"alpha": 1.0} and config.stage_config(2).method == "random"
    assert config.stage_config(2).options == {}
    inherited = tuner.PruningConfig(method="fastv", keep_ratio=0.5, options={"alpha": 0.5},
                                    stages=[Stage(3, 0.5, options={"alpha": 0.2})])
    assert inherited.stage_config(1).options == {"alpha": 0.2} and inherited.stage_config(1).method == "fastv"
    bad = {"stages[0].layer must be an int above the previous stage's layer 2": [Stage(2, 0.5)],
           "stages[1].layer must be an int above the previous stage's layer 4": [Stage(4, 0.5), Stage(3, 0.5)],
           "stages[0]: method 'fastv' needs keep_ratio": [Stage(3)],
           "stages[0]: keep_ratio must be a number in (0, 1]": [Stage(3, 1.5)],
           "stages[0] needs a layer and takes only": [{"keep_ratio": 0.5}],
           "stages must be a list": {"layer": 3}}
    for message, stages in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.5, stages=stages)


def test_stage_options_inherit_from_the_first_stage_unless_the_stage_names_a_method():
    """A stage without a method runs the first stage's method with its options, its own overriding them key by
    key; a stage that names a method (even the same) starts from that method's defaults."""
    config = tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.5,
                                 options={"n_image_pivots": 2, "pivot_order": "rank"},
                                 stages=[Stage(4, 0.5), Stage(6, 0.5, options={"n_text_pivots": 1}),
                                         Stage(8, 0.5, method="dart")])
    pivots = [(s.options["n_image_pivots"], s.options["n_text_pivots"], s.options["pivot_order"])
              for s in config.stage_configs()]
    assert pivots == [(2, 4, "rank"), (2, 4, "rank"), (2, 1, "rank"), (4, 4, "reference")]
    with pytest.raises(ValueError, match=re.escape("stages[0]: dart option n_image_pivots must be an int >= 0")):
        tuner.PruningConfig(method="dart", keep_ratio=0.5, stages=[Stage(4, 0.5, options={"n_image_pivots": -1})])
    with pytest.raises(ValueError, match=re.escape("stages[0]: unknown option(s) ['alpha'] for method 'dart'")):
        tuner.PruningConfig(method="fastv", keep_ratio=0.5, stages=[Stage(4, 0.5, method="dart",
                                                                          options={"alpha": 0.5})])


def test_stage_beyond_the_model_is_named(loaded: Loader):
    model, _ = loaded("llava", "sdpa")
    with pytest.raises(ValueError, match=r"^stages\[1\]: layer K=4 is out of range"):
        tuner.apply_pruning(model, tuner.PruningConfig(method="fastv", layer=1, keep_ratio=0.5,
                                                       stages=[Stage(2, 0.5), Stage(4, 0.5)]))
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_keep_all_stages_are_exact(family, attn, loaded: Loader):
    """Keep ratio 1.0 at every stage equals the unhooked model; keep-all later stages equal the one-stage config."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    ref_tokens, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, schedule("fastv", (1.0, 1.0, 1.0))) as handle:
        tokens, logits, _ = greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert handle.requests[0].stage_kept_vision == [handle.requests[0].n_vision] * 3
    one_stage = tuner.PruningConfig(method="fastv", layer=STAGE_LAYERS[0], keep_ratio=0.5)
    with tuner.apply_pruning(model, one_stage):
        ref_tokens, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, schedule("fastv", (0.5, 1.0, 1.0))):
        tokens, logits, _ = greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_cached_decode_equals_no_cache_recompute(family, attn, loaded: Loader):
    """Three stages; cache lengths N / P_0 / P_1 / P_2 (+ t) per layer; every step equals a no-cache run."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    _, ref_logits, _ = greedy(model, inputs)
    with tuner.apply_pruning(model, schedule("test_stride")) as handle:
        tokens, cached_logits, cache = greedy(model, inputs)
        stats = handle.requests[0]
        assert len(handle.requests) == 1
        assert (cached_logits[:, 0] - ref_logits[:, 0]).abs().max() > 1e-3
        expected_kept, kept = [], stats.n_vision[0]
        for _ in STAGE_LAYERS:
            kept = (kept + 1) // 2
            expected_kept.append([kept])
        assert stats.stage_kept_vision == expected_kept and stats.n_kept_vision == expected_kept[-1]
        prompt_length = inputs["input_ids"].shape[1]
        held = [prompt_length] * STAGE_LAYERS[0] + [n[0] for n, start, end in zip(
            stats.stage_n_kept, STAGE_LAYERS, (*STAGE_LAYERS[1:], 4)) for _ in range(start, end)]
        assert [cache.get_seq_length(i) for i in range(4)] == [n + NEW_TOKENS - 1 for n in held]
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
    assert all(r.stage_kept_vision == stats.stage_kept_vision for r in handle.requests)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_left_padded_batch_equals_rows_alone(family, attn, loaded: Loader):
    """DART, then FastV, then DART again (a stage without a method takes the first stage's)."""
    config = tuner.PruningConfig(method="dart", layer=1, keep_ratio=0.6, options={"n_image_pivots": 2},
                                 stages=(Stage(2, 0.6, method="fastv"), Stage(3, 0.6)))
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision = vision_of(model, inputs)
    with tuner.apply_pruning(model, config) as handle:
        batch_tokens, batch_logits, _ = greedy(model, inputs)
    stats = handle.requests[0]
    assert stats.n_kept[0] != stats.n_kept[1]
    for before, after in zip(stats.stage_kept_vision, stats.stage_kept_vision[1:]):
        assert after == [max(1, round(0.6 * n)) for n in before]
    for row in range(2):
        alone = tiny_vlms.row_inputs(family, inputs, row)
        with tuner.apply_pruning(model, config) as row_handle:
            tokens, logits, _ = greedy(model, alone)
        padding = int((inputs["attention_mask"][row] == 0).sum())
        row_vision = vision_of(model, alone)
        for stage in range(3):
            kept, row_kept = handle.last_stage_kept[stage][row], row_handle.last_stage_kept[stage][0]
            assert torch.equal(kept[vision[row, kept]] - padding, row_kept[row_vision[0, row_kept]])
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=ATOL)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_two_stage_prefill_equals_manual_recomputation(family, attn, loaded: Loader):
    """Stages at K=1 and K=2 by hand: each stage's layers run on its gathered states, with rotary and masks (and
    the family's per-token state, DeepStack rows) at that stage's original kept positions."""
    model, processor = loaded(family, attn)
    inputs = tiny_vlms.make_inputs(family, processor)
    text_kwargs, hidden = tiny_vlms.unhooked_forward(model, inputs, layer=1)
    config = tuner.PruningConfig(method="random", layer=1, keep_ratio=0.5, stages=[Stage(2, 0.5)])
    with tuner.apply_pruning(model, config) as handle, torch.no_grad():
        pruned = model(**inputs).logits
    kept = [handle.last_stage_kept[0][0], handle.last_stage_kept[1][0]]
    assert kept[1].numel() < kept[0].numel() < inputs["input_ids"].shape[1]
    assert bool(torch.isin(kept[1], kept[0]).all())

    text_model = model.get_decoder()
    hidden = tiny_vlms.hand_run_layers(model, inputs, hidden[:, kept[0]], kept[0], range(1, 2), text_kwargs)
    hidden = hidden[:, torch.searchsorted(kept[0], kept[1])]  # the slots of stage 1's tokens among stage 0's
    hidden = tiny_vlms.hand_run_layers(model, inputs, hidden, kept[1], range(2, len(text_model.layers)), text_kwargs)
    with torch.no_grad():
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ("llava", "qwen3_vl", "gemma3"))
def test_captures_only_at_stage_layers_and_removal_restores(family, loaded: Loader):
    """FastV at three stages swaps the attention function of layers K_j - 1 only; removal restores everything."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    layers = model.get_decoder().layers
    configs = [layer.self_attn.config for layer in layers]
    with torch.no_grad():
        before = model(**inputs).logits
    with tuner.apply_pruning(model, schedule("fastv")):
        captured = [i for i, layer in enumerate(layers) if hasattr(layer.self_attn, "_dart_tuner_capture")]
        assert captured == [k - 1 for k in STAGE_LAYERS]
        assert all(layers[i].self_attn.config._attn_implementation == "sdpa" for i in range(4) if i not in captured)
        with torch.no_grad():
            model(**inputs)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(layer.self_attn.config is config for layer, config in zip(layers, configs))
    assert not any(hasattr(layer.self_attn, "_dart_tuner_capture") for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_reports_describe_a_schedule():
    """Tables, exports and the dashboard label a schedule by its stages; a one-stage config reads as before."""
    import optuna

    from tuner.results.tables import describe_trial, trial_label

    def trial(config):
        return optuna.trial.create_trial(values=[0.5, 1.0], user_attrs={"config": config.to_dict()})

    schedule = tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.5,
                                   stages=[Stage(4, 0.5), Stage(6, budget=8, method="dart")])
    options = "alpha=1; n_image_pivots=4 n_text_pivots=4"  # each stage's searchable or non-default options, once
    assert describe_trial(trial(schedule)) == f"fastv@2:0.5>4:0.5>dart@6:8t {options}"
    assert trial_label(trial(schedule)) == ("fastv>dart", "2>4>6", options, "0.5>0.5>8t")
    stacked = tuner.config.stack(tuner.PruningConfig(method="random", layer=0, keep_ratio=0.5),
                                 tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.25, options={"alpha": 0.5}))
    assert trial_label(trial(stacked)) == ("random>fastv", "0>2", "alpha=0.5", "0.5>0.25")
    single = tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.5)
    assert describe_trial(trial(single)) == "fastv K=2 alpha=1 keep 0.5"
    pooled = tuner.PruningConfig(method="pooling", layer=2, keep_ratio=0.5)
    assert describe_trial(trial(pooled)) == "pooling K=2 keep 0.5" and trial_label(trial(pooled))[2] == "-"
    dart = tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.5, options={"pivot_metric": "l2"})
    assert describe_trial(trial(dart)) == "dart K=2 n_image_pivots=4 n_text_pivots=4 pivot_metric=l2 keep 0.5"


RECORDED: list[torch.Tensor] = []


@register_method("test_record_attention")
class RecordAttention(StrideSelection):
    """Test-only: `test_stride`'s choice (independent of attention), noting the attention row each stage was given."""

    def select(self, ctx: SelectionContext) -> Selection:
        RECORDED.append(ctx.last_row_attention.clone())
        return super().select(ctx)


@pytest.mark.parametrize("family", ("llava", "qwen2_vl", "qwen3_vl", "gemma3"))
def test_attention_captured_at_every_stage_layer_under_sdpa_equals_eager(family, loaded: Loader):
    """At each stage layer K_j - 1, the last row captured on an sdpa model equals eager's own attention weights
    there (`output_attentions`), over the tokens that layer holds, padding slots included."""
    sdpa_model, processor = loaded(family, "sdpa")
    eager_model, _ = loaded(family, "eager")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    config = schedule("test_record_attention")
    RECORDED.clear()
    with tuner.apply_pruning(sdpa_model, config), torch.no_grad():
        sdpa_model(**inputs)
    captured = list(RECORDED)
    with tuner.apply_pruning(eager_model, config), torch.no_grad():
        attentions = eager_model(**inputs, output_attentions=True).attentions
    assert len(captured) == len(STAGE_LAYERS)
    for stage, layer in enumerate(STAGE_LAYERS):
        expected = attentions[layer - 1][:, :, -1, :]
        assert captured[stage].shape == expected.shape
        torch.testing.assert_close(captured[stage], expected, rtol=0, atol=1e-5)
    assert captured[1].shape[-1] < captured[0].shape[-1]  # the later stage saw the shorter sequence
