"""Method-specific behaviour on hand-made selection contexts, config validation, and bad input to the hooks."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tiny_vlms
import tuner
from conftest import Loader
from tuner.models.attention import resolve_attn_implementation
from tuner.pruning import PruningMethod, get_method_class, register_method
from tuner.pruning.base import SelectionContext


def context(n_vision=(16,), hidden_size=4, prefix=2, suffix=3, budgets=None, seed=0) -> SelectionContext:
    """Rows of [prefix text, vision block, suffix text], left-padded to one length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [prefix + n + suffix for n in n_vision]
    width = max(lengths)
    vision = torch.zeros(len(n_vision), width, dtype=torch.bool)
    attention = torch.zeros_like(vision)
    for row, (n, length) in enumerate(zip(n_vision, lengths)):
        start = width - length
        attention[row, start:] = True
        vision[row, start + prefix:start + prefix + n] = True
    return SelectionContext(
        hidden_states=torch.randn(len(n_vision), width, hidden_size, generator=generator),
        vision_mask=vision, attention_mask=attention,
        input_ids=torch.randint(5, 100, (len(n_vision), width), generator=generator),
        budgets=budgets or [max(1, n // 4) for n in n_vision], final_norm=torch.nn.Identity())


def select(method: str, ctx: SelectionContext, **config):
    cfg = tuner.PruningConfig(method=method, keep_ratio=0.25, **config)
    return get_method_class(method)(cfg).select(ctx)


def test_random_is_seeded_by_config_and_content():
    ctx = context(n_vision=(32, 32))
    first, again = select("random", ctx), select("random", ctx)
    assert all(torch.equal(a, b) for a, b in zip(first.kept_vision, again.kept_vision))
    other_seed = select("random", ctx, seed=1)
    assert not torch.equal(first.kept_vision[0], other_seed.kept_vision[0])
    assert not torch.equal(first.kept_vision[0], first.kept_vision[1])  # rows differ in content
    for row, kept in enumerate(first.kept_vision):
        assert kept.numel() == 8 and bool(ctx.vision_mask[row, kept].all())
        assert torch.equal(kept, kept.sort().values)


def test_pooling_keeps_evenly_spaced_tokens():
    ctx = context(n_vision=(16,), budgets=[4])
    (kept,) = select("pooling", ctx).kept_vision
    start = int(ctx.vision_positions(0)[0])
    assert (kept - start).tolist() == [2, 6, 10, 14]  # centres of four slices of four


def test_fastv_keeps_the_most_attended_vision_tokens():
    ctx = context(n_vision=(10,), budgets=[3])
    attention = torch.zeros(1, 2, ctx.vision_mask.shape[1])
    vision = ctx.vision_positions(0)
    attention[0, 0, vision[[7, 2, 5]]] = torch.tensor([0.9, 0.5, 0.3])
    attention[0, 1, vision[9]] = 0.2  # mean over heads 0.1: below the three above (0.45, 0.25, 0.15)
    attention[0, :, -1] = 5.0  # the text token attended most is never a candidate
    ctx.last_row_attention = attention
    (kept,) = select("fastv", ctx).kept_vision
    assert kept.tolist() == vision[[2, 5, 7]].tolist()


@pytest.mark.parametrize("alpha, budget, expected", [
    (1.0, 2, [0, 3]),  # plain FastV: the two most attended
    (0.6, 2, [0, 3]),  # scores 0.6, 0.35, 0.4, 0.5086
    (0.3, 3, [1, 2, 3]),  # scores 0.3, 0.425, 0.7, 0.3275: v0, attended most, is dropped
    (0.0, 2, [1, 2]),  # pure uniqueness: the least similar to the last token
])
def test_fastv_alpha_mixes_min_max_normalised_importance_and_uniqueness(alpha, budget, expected):
    """Hand-worked: attention 0.8, 0.2, 0, 0.6 -> 1, 0.25, 0, 0.75; the last token's state is (1, 0), so
    -cos of (1, 0), (0, 1), (-1, 0), (1, 1) is -1, 0, 1, -0.7071 -> 0, 0.5, 1, 0.1464."""
    ctx = context(n_vision=(4,), hidden_size=2, budgets=[budget])
    vision = ctx.vision_positions(0)
    ctx.hidden_states[0, vision] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    ctx.hidden_states[0, -1] = torch.tensor([1.0, 0.0])
    attention = torch.zeros(1, 2, ctx.vision_mask.shape[1])
    attention[0, :, vision] = torch.tensor([0.8, 0.2, 0.0, 0.6])
    ctx.last_row_attention = attention
    (kept,) = select("fastv", ctx, options={"alpha": alpha}).kept_vision
    assert kept.tolist() == vision[expected].tolist()


@pytest.mark.parametrize("alpha", (-0.1, 1.5, float("nan"), "high", True))
def test_fastv_alpha_outside_0_1_is_refused(alpha):
    with pytest.raises(ValueError, match="fastv option alpha must be a number in \\[0, 1\\]"):
        tuner.PruningConfig(method="fastv", keep_ratio=0.5, options={"alpha": alpha})


def test_avgpool_pools_square_grids_in_2x2_windows():
    ctx = context(n_vision=(16,), budgets=[4])
    selection = select("avgpool", ctx)
    (kept,), (states,) = selection.kept_vision, selection.new_states
    vision = ctx.vision_positions(0)
    grid = vision.view(4, 4)
    assert kept.tolist() == grid[::2, ::2].reshape(-1).tolist()  # window top-left tokens
    top_left_window = ctx.hidden_states[0, grid[:2, :2].reshape(-1)].mean(0)
    torch.testing.assert_close(states[0], top_left_window)


def test_avgpool_pools_non_square_runs_in_groups():
    ctx = context(n_vision=(10,), budgets=[3])
    selection = select("avgpool", ctx, options={"stride": 2})
    vision = ctx.vision_positions(0)
    assert selection.kept_vision[0].tolist() == vision[[0, 4, 8]].tolist()
    torch.testing.assert_close(selection.new_states[0][2], ctx.hidden_states[0, vision[8:10]].mean(0))


@pytest.mark.parametrize("rule, kwargs, expected", [
    ("llava15", {}, 4 + 8 * 16),  # max_num_trunction 128 -> quota 16 -> 132 kept of 576
    ("llava15", {"max_num_trunction": 64}, 4 + 8 * 8),
    ("qwen", {}, 4 + 8 * int(576 * 0.25 / 8)),
])
def test_dart_reference_quota_rules_through_the_config(rule, kwargs, expected):
    ctx = context(n_vision=(576,), hidden_size=8, suffix=12)
    ctx.keys = torch.randn(ctx.hidden_states.shape)
    (kept,) = select("dart", ctx, options={"quota_rule": rule, **kwargs}).kept_vision
    assert kept.numel() == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=-1, keep_ratio=0.5), "layer must be an int >= 0"),
    (dict(layer=0, keep_ratio=0.5), "reads layer K-1's keys or attention"),
    (dict(keep_ratio=0.0), "keep_ratio"),
    (dict(keep_ratio=1.01), "keep_ratio"),
    (dict(keep_ratio=float("nan")), "keep_ratio"),
    (dict(budget=0), "budget"),
    (dict(keep_ratio=0.5, budget=8), "not both"),
    (dict(), "needs keep_ratio"),
    (dict(method="dartt", keep_ratio=0.5), "unknown pruning method 'dartt'.*avgpool, cdpruner, dart, divprune, fastv"),
    (dict(keep_ratio=0.5, options={"n_image_pivots": -1}), "dart option n_image_pivots must be an int >= 0"),
    (dict(keep_ratio=0.5, options={"n_text_pivots": 2.5}), "dart option n_text_pivots must be an int >= 0"),
    (dict(keep_ratio=0.5, options={"n_image_pivots": True}), "n_image_pivots must be an int"),
    (dict(keep_ratio=0.5, options={"n_image_pivots": 0, "n_text_pivots": 0}), "pivots must be >= 1"),
    (dict(keep_ratio=0.5, options={"pivot_order": "random"}), "pivot_order must be one of"),
    (dict(keep_ratio=0.5, options=[("n_image_pivots", 4)]), "options must be a mapping"),
    (dict(method="fastv", keep_ratio=0.5, options={"alpha": 1.5}), "fastv option alpha must be a number in"),
    (dict(method="fastv", keep_ratio=0.5, options={"n_image_pivots": 4}), "unknown option.*n_image_pivots"),
    (dict(method="window_fastv", keep_ratio=0.5, options={"window": 1}), "window must be an int in \\[2, 64\\]"),
    (dict(keep_ratio=0.5, options={"pivot_metrik": "l2"}), "unknown option.*pivot_metrik.*allowed"),
    (dict(keep_ratio=0.5, options={"pivot_metric": "cos"}), "pivot_metric"),
    (dict(budget=64, options={"quota_rule": "llava15"}), "cannot be combined"),
    (dict(options={"quota_rule": "qwen"}), "set keep_ratio"),
    (dict(method="avgpool", keep_ratio=0.5, options={"stride": 0}), "stride"),
    (dict(method="random", keep_ratio=0.5, options={"stride": 2}), "unknown option"),
    (dict(method="avgpool"), "'avgpool' needs keep_ratio"),
    (dict(options={"quota": 4, "quota_rule": "qwen"}, keep_ratio=0.5), "not both"),
])
def test_bad_configs_name_the_culprit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tuner.PruningConfig(**kwargs)


def test_a_method_registered_later_validates_configs_at_construction():
    @register_method("test_even_budget")
    class EvenBudget(PruningMethod):
        @classmethod
        def validate(cls, config):
            super().validate(config)
            if config.budget is not None and config.budget % 2:
                raise ValueError(f"{cls.name} needs an even budget")

    assert "test_even_budget" in tuner.available_methods() and get_method_class("test_even_budget") is EvenBudget
    tuner.PruningConfig(method="test_even_budget", budget=4)
    with pytest.raises(ValueError, match="test_even_budget needs an even budget"):
        tuner.PruningConfig(method="test_even_budget", budget=3)
    with pytest.raises(ValueError, match="'test_even_budget' is already registered by EvenBudget"):
        register_method("test_even_budget")(type("Other", (PruningMethod,), {}))


def test_dart_pivots_are_options_not_shared_fields():
    """Only the shared fields are PruningConfig's own; DART's pivots are its options (schema-1 data is read by
    tuner.config.schema)."""
    with pytest.raises(TypeError, match="n_image_pivots"):
        tuner.PruningConfig(keep_ratio=0.5, n_image_pivots=4)


def test_options_that_fix_the_amount_need_no_keep_ratio():
    tuner.PruningConfig(method="avgpool", options={"stride": 2})
    tuner.PruningConfig(method="dart", options={"quota": 16})
    tuner.PruningConfig(method="dart", options={"quota_rule": "llava15"})


def test_config_round_trips_through_a_dict():
    cfg = tuner.PruningConfig(method="dart", layer=3, budget=64, options={"n_text_pivots": 2, "pivot_metric": "l2"})
    assert tuner.PruningConfig(**cfg.to_dict()) == cfg
    assert cfg.options["n_image_pivots"] == 4 and cfg.options["pivot_order"] == "reference"  # defaults filled in
    assert cfg == tuner.PruningConfig(method="dart", layer=3, budget=64,
                                      options={**cfg.options, "n_image_pivots": 4})  # equal by value
    assert tuner.PruningConfig(method="keep_all").budget_for(10) == 10


@pytest.mark.parametrize("layer", (4, 7))
def test_layer_beyond_the_model_is_rejected(layer, loaded: Loader):
    model, _ = loaded("llava", "sdpa")
    with pytest.raises(ValueError, match=r"K must be in 0\.\.3"):
        tuner.apply_pruning(model, tuner.PruningConfig(layer=layer, keep_ratio=0.5))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_prompt_without_vision_tokens_fails_before_any_compute(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    text_only = processor.tokenizer(["USER: what colour is the sky? ASSISTANT:"], return_tensors="pt")
    calls = []
    probe = model.get_decoder().embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        with tuner.apply_pruning(model, tuner.PruningConfig(keep_ratio=0.5)):
            with pytest.raises(ValueError, match="no vision tokens in the prompt"):
                model(**text_only)
        assert calls == []
        with torch.no_grad():
            expected = model(**text_only).logits
        with tuner.apply_pruning(model, tuner.PruningConfig(keep_ratio=0.5, require_vision=False)) as handle:
            with torch.no_grad():
                assert torch.equal(model(**text_only).logits, expected)
        assert handle.requests == []
    finally:
        probe.remove()


def test_more_image_pivots_than_vision_tokens_are_clamped_to_the_row(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    with tuner.apply_pruning(model, tuner.PruningConfig(keep_ratio=0.5, options={"n_image_pivots": 100})) as handle:
        with pytest.warns(UserWarning, match="dart option n_image_pivots=100 exceeds the 64 vision tokens"):
            model(**inputs)
    assert handle.requests[0].n_kept_vision == [32]


def test_unsupported_model_class_is_named_with_the_supported_ones():
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model class LlamaForCausalLM.*LlavaForConditionalGeneration"):
        tuner.apply_pruning(lm, tuner.PruningConfig(keep_ratio=0.5))
    ids = torch.cat([torch.randint(3, 60, (1, 3)), torch.full((1, 20), 63), torch.randint(3, 60, (1, 5))], 1)
    with tuner.apply_pruning(lm, tuner.PruningConfig(keep_ratio=0.5), vision_token_ids=[63]) as handle:
        lm(ids)  # a plain LM is accepted with explicit vision ids (how the benchmark runs)
    assert handle.requests[0].n_kept_vision == [10]


def test_inputs_embeds_only_and_double_application_are_refused(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with tuner.apply_pruning(model, tuner.PruningConfig(keep_ratio=0.5)):
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        with pytest.raises(RuntimeError, match="already has pruning applied"):
            tuner.apply_pruning(model, tuner.PruningConfig(method="random", keep_ratio=0.5))


def test_attention_implementation_choice():
    assert resolve_attn_implementation("auto", device="cpu") == "sdpa"
    assert resolve_attn_implementation("eager", device="cpu") == "eager"
    with pytest.raises(ValueError, match="flash_attention_2.*CUDA"):
        resolve_attn_implementation("flash_attention_2", device="cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attn_implementation("flash", device="cpu")
    from transformers import Gemma3ForConditionalGeneration

    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration does not support it"):
        resolve_attn_implementation("flash_attention_2", device="cpu", model_class=Gemma3ForConditionalGeneration)
    assert resolve_attn_implementation("auto", device="cpu", model_class=Gemma3ForConditionalGeneration) == "sdpa"


@pytest.mark.parametrize("family, explicit, other", [("llava", "llava15", "qwen"), ("qwen2_vl", "qwen", "llava15")])
def test_dart_family_quota_rule_is_the_families_reference_rule(family, explicit, other, loaded):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    kept = {}
    for rule in ("family", explicit, other):
        config = tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.5,
                                     options={"quota_rule": rule, "max_num_trunction": 16})
        with tuner.apply_pruning(model, config) as handle, torch.no_grad():
            model(**inputs)
        kept[rule] = [k.tolist() for k in handle.last_kept]
    assert kept["family"] == kept[explicit]
    assert kept["family"] != kept[other]  # the rules differ here, so the option really chose one


def test_dart_family_quota_rule_fails_before_compute_where_it_cannot_resolve(loaded):
    model, _ = loaded("qwen2_vl", "sdpa")
    with pytest.raises(ValueError, match="quota_rule 'qwen' derives the quota from keep_ratio"):
        tuner.apply_pruning(model, tuner.PruningConfig(method="dart", options={"quota_rule": "family"}))
    assert not getattr(model, "_dart_tuner_handle", None)
    text_model = model.get_decoder()
    with pytest.raises(ValueError, match="custom family has no reference quota rule"):
        tuner.apply_pruning(text_model, tuner.PruningConfig(method="dart", keep_ratio=0.5,
                                                            options={"quota_rule": "family"}),
                            vision_token_ids=[model.config.image_token_id])
