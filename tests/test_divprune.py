"""`divprune`: the greedy max-min cosine-distance selection, against a literal restatement and hand-worked picks,
and on a tiny LLaVA (keep ratio 1.0 exact, left-padded batch equals rows alone, cached decode equals recompute)."""

import math

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.divprune import max_min_order

K = 2
LAYERS = (0, K)  # before the language model (on the input embeddings) and inside it
NEW_TOKENS = 4
ATOL = 1e-4


def official_order(features: torch.Tensor, n_picks: int) -> list[int]:
    """DivPrune's greedy loop restated from the paper and its official code, one row: distances 1 - cos; the first
    pick maximises a token's second-smallest distance (the smallest is to itself), every later pick the smallest
    distance to the picks so far; `argmax` takes the first maximum."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picks = []
    for step in range(n_picks):
        if step == 0:
            scores = distance.topk(2, dim=0, largest=False).values[1]
        else:
            scores = distance[picks].min(0).values
        picks.append(int(scores.argmax()))
    return picks


def angles(*degrees: float, norms=None) -> torch.Tensor:
    """2-D vectors at the given angles (norms vary: cosine distance must not see them)."""
    norms = norms or [1.0] * len(degrees)
    return torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))]
                         for a, r in zip(degrees, norms)])


def row_context(vision_states: torch.Tensor, budget: int, prefix: int = 2, suffix: int = 3,
                padding: int = 0) -> SelectionContext:
    """One row: `padding` pad slots, `prefix` text tokens, the vision tokens, `suffix` text tokens."""
    n, width = vision_states.shape
    length = padding + prefix + n + suffix
    hidden = torch.randn(1, length, width, generator=torch.Generator().manual_seed(1))
    hidden[0, padding + prefix:padding + prefix + n] = vision_states
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, padding + prefix:padding + prefix + n] = True
    attention = torch.ones(1, length, dtype=torch.bool)
    attention[0, :padding] = False
    return SelectionContext(hidden_states=hidden, vision_mask=vision, attention_mask=attention,
                            input_ids=torch.zeros(1, length, dtype=torch.long), budgets=[budget],
                            final_norm=torch.nn.Identity())


def select(ctx: SelectionContext) -> list[torch.Tensor]:
    method = get_method_class("divprune")(tuner.PruningConfig(method="divprune", keep_ratio=0.5))
    return method.select(ctx).kept_vision


# Tokens at 15, 90, 165, 270 and 0 degrees; d = 1 - cos of the angle between them:
#          t0      t1      t2      t3      t4
#   t0      -    0.741   1.866   1.259   0.034
#   t1   0.741     -     0.741   2.000   1.000
#   t2   1.866   0.741     -     1.259   1.966
#   t3   1.259   2.000   1.259     -     1.000
#   t4   0.034   1.000   1.966   1.000     -
# Nearest other: t0 0.034, t1 0.741, t2 0.741, t3 1.000, t4 0.034 -> t3 first.
# Distance to t3: t0 1.259, t1 2.000, t2 1.259, t4 1.000 -> t1.
# Min distance to {t3, t1}: t0 0.741, t2 0.741, t4 1.000 -> t4.
# Min distance to {t3, t1, t4}: t0 0.034, t2 0.741 -> t2; then t0.
HAND_ORDER = [3, 1, 4, 2, 0]
HAND_TOKENS = angles(15, 90, 165, 270, 0, norms=[1.0, 3.0, 0.5, 2.0, 1.5])


def test_hand_worked_greedy_order():
    order = max_min_order(HAND_TOKENS[None], torch.ones(1, 5, dtype=torch.bool), [5])
    assert order[0].tolist() == HAND_ORDER
    assert official_order(HAND_TOKENS, 5) == HAND_ORDER


@pytest.mark.parametrize("budget", range(1, 6))
def test_method_keeps_the_first_picks_exactly_in_position_order(budget):
    (kept,) = select(row_context(HAND_TOKENS, budget))
    assert kept.tolist() == sorted(2 + i for i in HAND_ORDER[:budget])


def test_the_first_pick_is_the_token_whose_nearest_neighbour_is_farthest():
    # At 180, 172, 20, -20 and 90 degrees: t3 is farthest from the others in total (sum of d 5.49 against t4's
    # 3.86) but its nearest, t2, is 40 degrees away (d 0.234); t4's nearest, t2, is 70 degrees away (d 0.658).
    tokens = angles(180, 172, 20, -20, 90)
    assert max_min_order(tokens[None], torch.ones(1, 5, dtype=torch.bool), [1])[0].tolist() == \
        official_order(tokens, 1) == [4]


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_match_the_official_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(40, 16, generator=generator)
    order = max_min_order(features[None], torch.ones(1, 40, dtype=torch.bool), [25])
    assert order[0].tolist() == official_order(features, 25)


def test_ties_go_to_the_earlier_token_and_duplicates_are_never_picked_twice():
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # three copies of one direction
    order = max_min_order(tokens[None], torch.ones(1, 4, dtype=torch.bool), [4])[0].tolist()
    assert order == [3, 0, 1, 2]  # t3 (nearest other at distance 1), then the copies in position order
    (kept,) = select(row_context(tokens, 3))
    assert kept.tolist() == [2, 3, 5]


def test_batched_rows_with_left_padding_equal_each_row_alone():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(12, 8, generator=generator), torch.randn(7, 8, generator=generator)
    alone = [select(row_context(a, 5))[0], select(row_context(b, 3))[0]]
    long, short = row_context(a, 5), row_context(b, 3, padding=5)
    batch = SelectionContext(
        hidden_states=torch.cat([long.hidden_states, short.hidden_states]),
        vision_mask=torch.cat([long.vision_mask, short.vision_mask]),
        attention_mask=torch.cat([long.attention_mask, short.attention_mask]),
        input_ids=torch.zeros(2, long.vision_mask.shape[1], dtype=torch.long), budgets=[5, 3],
        final_norm=torch.nn.Identity())
    kept = select(batch)
    assert kept[0].tolist() == alone[0].tolist()
    assert (kept[1] - 5).tolist() == alone[1].tolist()
    assert [k.numel() for k in kept] == [5, 3]


def test_a_full_budget_keeps_every_vision_token_without_a_greedy_pass():
    (kept,) = select(row_context(HAND_TOKENS, 5))
    assert kept.tolist() == [2, 3, 4, 5, 6]


# --- on a tiny LLaVA -------------------------------------------------------------------------------------------
def config(layer: int, **kwargs) -> tuner.PruningConfig:
    kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method="divprune", layer=layer, **kwargs)


@pytest.mark.parametrize("layer", LAYERS)
def test_keep_ratio_one_equals_the_unhooked_model(layer, loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    ref_tokens, ref_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    with tuner.apply_pruning(model, config(layer, keep_ratio=1.0)) as handle:
        tokens, logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert handle.requests[0].n_kept_vision == handle.requests[0].n_vision


@pytest.mark.parametrize("layer", LAYERS)
def test_hooked_selection_is_the_greedy_order_on_the_states_entering_layer_k(layer, loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    _, hidden = tiny_vlms.unhooked_forward(model, inputs, layer=layer)
    vision = tiny_vlms.vision_mask(model, inputs)
    positions = vision[0].nonzero().squeeze(1)
    budget = config(layer).budget_for(positions.numel())
    order = official_order(hidden[0, positions], budget)
    with tuner.apply_pruning(model, config(layer)) as handle, torch.no_grad():
        model(**inputs)
    assert tiny_vlms.kept_vision(handle, vision, 0).tolist() == sorted(positions[order].tolist())
    assert handle.requests[0].n_kept_vision == [budget]


@pytest.mark.parametrize("layer", LAYERS)
def test_left_padded_batch_equals_rows_alone(layer, loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    tiny_vlms.assert_batch_equals_rows_alone(model, "llava", inputs, config(layer), NEW_TOKENS, ATOL)


@pytest.mark.parametrize("layer", LAYERS)
def test_cached_decode_equals_no_cache_recompute(layer, loaded: Loader):
    """DivPrune looks at vision tokens only, whose states entering layer K do not depend on later tokens, so the
    no-cache recomputation of prompt + generated tokens keeps the same set: the method itself runs both ways."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    prompt_length = inputs["input_ids"].shape[1]
    with tuner.apply_pruning(model, config(layer)) as handle:
        tokens, cached_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
        generated_with = handle.last_kept[0].clone()
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
        recomputed_with = handle.last_kept[0]
    assert len(handle.requests) == 1 + NEW_TOKENS  # the generate prefill, then one per recomputation
    assert torch.equal(recomputed_with[recomputed_with < prompt_length], generated_with)


def test_eval_runs_divprune_and_cdpruner_before_the_language_model_by_default():
    from tuner.cli.evaluate import _method_layer

    assert _method_layer("divprune", None) == _method_layer("cdpruner", None) == 0  # where the papers prune
    assert _method_layer("divprune", 3) == 3 and _method_layer("dart", None) == 2
