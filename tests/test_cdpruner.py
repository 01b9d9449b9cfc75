"""`cdpruner`: the conditional DPP's greedy MAP against brute-force log-det maximisation, the relevance weighting
worked by hand, and on a tiny LLaVA (keep ratio 1.0 exact, batch equals rows alone, cached decode equals
recompute)."""

import math

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.cdpruner import greedy_map_order, instruction_mask

K = 2
LAYERS = (0, K)  # before the language model (on the input embeddings) and inside it
NEW_TOKENS = 4
ATOL = 1e-4


# --- the paper's algorithm, restated -------------------------------------------------------------------------
def restated_kernel(vision: torch.Tensor, instruction: torch.Tensor | None, theta=None,
                    negate=False) -> torch.Tensor:
    """L_ij = w_i cos(v_i, v_j) w_j in float64; w from r_i = mean_t cos(v_i, t), min-max normalised as
    (r - min + 1e-6) / (max - min), then w = r (theta None) or exp(theta / (2 (1 - theta)) r); w = 1 without
    instruction tokens."""
    vision = vision.double()
    cosine = torch.nn.functional.cosine_similarity
    similarity = cosine(vision[:, None], vision[None], dim=-1)
    if instruction is None or len(instruction) == 0:
        weights = torch.ones(len(vision), dtype=torch.float64)
    else:
        relevance = cosine(vision[:, None], instruction.double()[None], dim=-1).mean(1)
        relevance = -relevance if negate else relevance
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
        weights = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
    return weights[:, None] * similarity * weights[None]


def brute_force_greedy(kernel: torch.Tensor, n_picks: int) -> list[int]:
    """Each step adds the token that maximises log det L_S of the grown set, computed directly; values within
    1e-9 (equal up to rounding) go to the earlier token."""
    picks: list[int] = []
    for _ in range(n_picks):
        best, best_value = None, -math.inf
        for j in range(len(kernel)):
            if j in picks:
                continue
            subset = picks + [j]
            sign, logdet = torch.linalg.slogdet(kernel[subset][:, subset])
            value = float(logdet) if sign > 0 else -math.inf
            if value > best_value + 1e-9:
                best, best_value = j, value
        picks.append(best)
    return picks


def row_context(vision: torch.Tensor, instruction: torch.Tensor, budget: int, prefix: torch.Tensor | None = None,
                padding: int = 0) -> SelectionContext:
    """One row: `padding` pad slots, `prefix` text states, the vision tokens, then the instruction tokens."""
    prefix = torch.zeros(0, vision.shape[1]) if prefix is None else prefix
    states = torch.cat([torch.zeros(padding, vision.shape[1]), prefix, vision, instruction])[None]
    length = states.shape[1]
    start = padding + len(prefix)
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, start:start + len(vision)] = True
    attention = torch.ones(1, length, dtype=torch.bool)
    attention[0, :padding] = False
    return SelectionContext(hidden_states=states, vision_mask=mask, attention_mask=attention,
                            input_ids=torch.zeros(1, length, dtype=torch.long), budgets=[budget],
                            final_norm=torch.nn.Identity())


def select(ctx: SelectionContext, **options) -> list[list[int]]:
    cfg = tuner.PruningConfig(method="cdpruner", keep_ratio=0.5, options=options)
    return [k.tolist() for k in get_method_class("cdpruner")(cfg).select(ctx).kept_vision]


# --- greedy MAP ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_greedy_map_on_a_six_token_kernel_is_brute_force_log_det_maximisation(seed):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(6, 8, generator=generator)
    instruction = torch.randn(3, 8, generator=generator)
    kernel = restated_kernel(vision, instruction, theta=0.5)
    expected = brute_force_greedy(kernel, 6)
    order = greedy_map_order(kernel[None].float(), torch.ones(1, 6), torch.ones(1, 6, dtype=torch.bool), [6])
    assert order[0].tolist() == expected


@pytest.mark.parametrize("theta, negate", [(None, False), (0.5, False), (0.0, False), (None, True), (0.8, True)])
@pytest.mark.parametrize("seed", range(3))
def test_method_keeps_the_brute_force_greedy_set_for_every_budget(seed, theta, negate):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(6, 8, generator=generator)
    instruction = torch.randn(3, 8, generator=generator)
    prefix = torch.randn(2, 8, generator=generator)  # before the image: never an instruction token
    expected = brute_force_greedy(restated_kernel(vision, instruction, theta, negate), 6)
    for budget in range(1, 7):
        (kept,) = select(row_context(vision, instruction, budget, prefix=prefix), theta=theta,
                         negate_relevance=negate)
        assert kept == sorted(2 + i for i in expected[:budget])


# --- relevance, by hand ---------------------------------------------------------------------------------------
# Vision tokens v0 = (1, 0), v1 = (0.8, 0.6), v2 = (0, 1); cos(v0, v1) = 0.8, cos(v0, v2) = 0, cos(v1, v2) = 0.6.
# One instruction token t = (0, 1): relevance cos(v, t) = 0, 0.6, 1 -> min-max 1e-6, 0.6, 1 (+1e-6).
# - theta 0 (weights 1): diag 1, 1, 1 -> v0 (the first), then gains 1 - cos^2: v1 0.36, v2 1 -> v2.
# - theta None (w = r): diag 1e-12, 0.36, 1 -> v2; then v1 0.36 - 0.6^2 * 0.6^2 = 0.2304 beats v0's 1e-12.
# - negated (r = 1, 0.4, 1e-6): diag 1, 0.16, 1e-12 -> v0; then v1 0.16 - (0.4 * 0.8)^2 = 0.0576 -> v1.
# - theta 0.2 (w = exp(0.125 r) = 1, 1.078, 1.133): v2 first (1.284); then v0 1.0 beats v1 1.162 - 0.647^2 = 0.744.
# - theta 0.5 (w = exp(0.5 r) = 1, 1.350, 1.649): v2 first (2.718); then v1 1.822 - 0.810^2 = 1.166 beats v0 1.0.
HAND_VISION = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
HAND_INSTRUCTION = torch.tensor([[0.0, 2.0]])


@pytest.mark.parametrize("options, budget, expected", [
    (dict(theta=0.0), 2, [0, 2]),
    (dict(), 2, [1, 2]),
    (dict(), 1, [2]),
    (dict(negate_relevance=True), 2, [0, 1]),
    (dict(negate_relevance=True), 1, [0]),
    (dict(theta=0.2), 2, [0, 2]),
    (dict(theta=0.5), 2, [1, 2]),
])
def test_relevance_weighting_by_hand(options, budget, expected):
    (kept,) = select(row_context(HAND_VISION, HAND_INSTRUCTION, budget, prefix=torch.ones(1, 2)), **options)
    assert kept == [1 + i for i in expected]
    theta, negate = options.get("theta"), options.get("negate_relevance", False)
    assert sorted(brute_force_greedy(restated_kernel(HAND_VISION, HAND_INSTRUCTION, theta, negate), budget)) \
        == expected


def test_only_tokens_after_the_last_vision_token_are_the_instruction():
    # A prefix pointing at v0 would make v0 the most relevant if it counted.
    before = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert select(row_context(HAND_VISION, HAND_INSTRUCTION, 1, prefix=before)) == [[4]]  # v2
    vision = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)[None]  # two images, text between them
    valid = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)[None]  # one pad slot
    assert instruction_mask(vision, valid)[0].nonzero().squeeze(1).tolist() == [6, 7]


def test_without_instruction_tokens_every_token_weighs_one():
    no_instruction = row_context(HAND_VISION, torch.zeros(0, 2), 2, prefix=torch.tensor([[0.0, 1.0]]))
    assert select(no_instruction) == select(no_instruction, theta=0.0) == [[1, 3]]  # v0, v2: diversity alone


def test_exact_budgets_and_left_padded_rows_equal_each_row_alone():
    generator = torch.Generator().manual_seed(9)  # a draw where a batch-wide min-max changes both rows' picks
    a, b = torch.randn(12, 8, generator=generator), torch.randn(7, 8, generator=generator)
    # Row b's instruction points along its image, so its relevance range lies far above row a's: a batch-wide
    # min-max (the official code's) would change row b's weights.
    ia, ib = torch.randn(4, 8, generator=generator), b.mean(0, keepdim=True).repeat(2, 1)
    long, short = row_context(a, ia, 5), row_context(b, ib, 3, padding=7)
    alone = [select(long)[0], select(row_context(b, ib, 3))[0]]
    batch = SelectionContext(
        hidden_states=torch.cat([long.hidden_states, short.hidden_states]),
        vision_mask=torch.cat([long.vision_mask, short.vision_mask]),
        attention_mask=torch.cat([long.attention_mask, short.attention_mask]),
        input_ids=torch.zeros(2, long.vision_mask.shape[1], dtype=torch.long), budgets=[5, 3],
        final_norm=torch.nn.Identity())
    kept = select(batch)
    assert [len(k) for k in kept] == [5, 3]
    assert kept[0] == alone[0]
    assert [p - 7 for p in kept[1]] == alone[1]


def test_duplicates_still_fill_the_budget_with_distinct_tokens():
    vision = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rank 2: gains reach 0
    (kept,) = select(row_context(vision, torch.tensor([[1.0, 1.0]]), 4))
    assert kept == [0, 1, 2, 3]
    (kept,) = select(row_context(vision, torch.tensor([[1.0, 1.0]]), 3), theta=0.0)
    assert len(set(kept)) == 3 and 3 in kept


@pytest.mark.parametrize("options, match", [
    (dict(theta=1.0), "theta must be a number in \\[0, 1\\) or null"),
    (dict(theta=-0.1), "theta"),
    (dict(theta="high"), "theta"),
    (dict(negate_relevance="yes"), "negate_relevance must be true or false"),
    (dict(relevance="clip"), "unknown option"),
])
def test_bad_options_name_the_culprit(options, match):
    with pytest.raises(ValueError, match=match):
        tuner.PruningConfig(method="cdpruner", keep_ratio=0.5, options=options)


# --- on a tiny LLaVA -------------------------------------------------------------------------------------------
def config(layer: int, **kwargs) -> tuner.PruningConfig:
    kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method="cdpruner", layer=layer, **kwargs)


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
def test_hooked_selection_is_the_restated_dpp_on_the_states_entering_layer_k(layer, loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    _, hidden = tiny_vlms.unhooked_forward(model, inputs, layer=layer)
    vision = tiny_vlms.vision_mask(model, inputs)
    positions = vision[0].nonzero().squeeze(1)
    instruction = hidden[0, int(positions[-1]) + 1:]
    budget = config(layer).budget_for(positions.numel())
    order = brute_force_greedy(restated_kernel(hidden[0, positions], instruction), budget)
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
    """Generated tokens come after the image, so a no-cache recomputation would see a longer instruction and may
    choose another set: the recomputation keeps the set the cached generate chose (`test_fixed`)."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    vision = tiny_vlms.vision_mask(model, inputs)
    with tuner.apply_pruning(model, config(layer)) as handle:
        tokens, cached_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    chosen = tiny_vlms.kept_vision(handle, vision, 0)
    assert 0 < chosen.numel() < int(vision.sum())
    fixed = tuner.PruningConfig(method="test_fixed", layer=layer, options={"positions": [chosen.tolist()]})
    with tuner.apply_pruning(model, fixed):
        fixed_tokens, fixed_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)  # the same set, fixed
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
    assert torch.equal(fixed_tokens, tokens)
    torch.testing.assert_close(fixed_logits, cached_logits, rtol=0, atol=ATOL)
