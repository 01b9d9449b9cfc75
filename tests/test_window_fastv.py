"""`window_fastv`: the companion paper's per-window top-k on hand-worked grids, and every family's image grids."""

from fractions import Fraction

import optuna
import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.models.families import adapter_for
from tuner.models.families.grids import ImageGrids
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.window_fastv import auto_window
from tuner.search.space import parse_space


def grid_context(scores: list[float], grids: ImageGrids, budget: int, prefix: int = 2) -> SelectionContext:
    """One row: `prefix` text tokens, the vision tokens (their scores as the last token's attention), one last token."""
    n = len(scores)
    length = prefix + n + 1
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, prefix:prefix + n] = True
    attention = torch.zeros(1, 2, length)  # two heads, averaged: give both the same row
    attention[0, :, prefix:prefix + n] = torch.tensor(scores)
    return SelectionContext(hidden_states=torch.zeros(1, length, 4), vision_mask=vision,
                            attention_mask=torch.ones(1, length, dtype=torch.bool),
                            input_ids=torch.zeros(1, length, dtype=torch.long), budgets=[budget],
                            final_norm=torch.nn.Identity(), last_row_attention=attention, image_grids=[grids])


def select(ctx: SelectionContext, window: int) -> list[int]:
    cfg = tuner.PruningConfig(method="window_fastv", keep_ratio=0.5, options={"window": window})
    (kept,) = get_method_class("window_fastv")(cfg).select(ctx).kept_vision
    return kept.tolist()


def reference(scores: list[float], windows: list[list[int]], budget: int) -> list[int]:
    """The rule restated: windows (lists of token indices) ordered by first token, quota floor(B n_i / N) plus one
    for the largest remainders (ties: earlier window), top scores inside (ties: earlier token)."""
    windows = sorted(windows, key=min)
    total = sum(len(w) for w in windows)
    shares = [Fraction(budget * len(w), total) for w in windows]
    quotas = [int(s) for s in shares]
    by_remainder = sorted(range(len(windows)), key=lambda i: (-(shares[i] - quotas[i]), i))
    for i in by_remainder[:budget - sum(quotas)]:
        quotas[i] += 1
    kept = []
    for window, quota in zip(windows, quotas):
        kept += sorted(window, key=lambda i: (-scores[i], i))[:quota]
    return sorted(kept)


# A 4x4 grid (positions 2..17), scores rising down the image as FastV's position bias has them.
SCORES_4X4 = [0.10, 0.30, 0.20, 0.05,
              0.15, 0.25, 0.40, 0.35,
              0.50, 0.45, 0.60, 0.90,
              0.80, 0.70, 0.65, 0.85]
WINDOWS_2X2 = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def grid_4x4(prefix: int = 2) -> ImageGrids:
    return ImageGrids([torch.arange(prefix, prefix + 16).view(4, 4)], torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(("budget", "expected"), [
    # 4 windows of 4: one each, the window's best.
    (4, [1, 6, 11, 12]),
    # 6 = 4 x 1.5: floors 1 each, remainders equal: the two windows whose first token comes first get a second.
    (6, [1, 5, 6, 7, 11, 12]),
    # 9 = 4 x 2.25: two each, the extra one to the first window.
    (9, [1, 4, 5, 6, 7, 11, 12, 13, 15]),
])
def test_window_fastv_takes_top_k_per_2x2_window_with_an_exact_budget_split(budget, expected):
    kept = select(grid_context(SCORES_4X4, grid_4x4(), budget), window=2)
    assert kept == [2 + i for i in sorted(expected)]
    assert kept == [2 + i for i in reference(SCORES_4X4, WINDOWS_2X2, budget)]


def test_window_fastv_spreads_what_fastv_takes_from_the_bottom():
    rising = [float(i) for i in range(16)]  # the last (bottom) tokens score highest
    ctx = grid_context(rising, grid_4x4(), 4)
    assert select(ctx, window=2) == [2 + i for i in (5, 7, 13, 15)]  # one per quadrant
    fastv = tuner.PruningConfig(method="fastv", keep_ratio=0.5)
    assert get_method_class("fastv")(fastv).select(ctx).kept_vision[0].tolist() == [2 + i for i in (12, 13, 14, 15)]


def test_uneven_windows_and_leftover_tokens_follow_the_largest_remainder_rule():
    # A 3x3 grid (positions 2..10) and three tokens on no grid (11..13): window 2 gives windows of 4, 2, 2, 1 tokens
    # and one leftover window of 3 (window^2 = 4 consecutive tokens at most). Budget 5 of 12: shares 20/12, 10/12,
    # 10/12, 5/12, 15/12 -> floors 1, 0, 0, 0, 1; the 3 left go to remainders 10, 10, 8 -> quotas 2, 1, 1, 0, 1.
    scores = [0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.4, 0.6, 0.7, 0.05, 0.95, 0.5]
    grids = ImageGrids([torch.arange(2, 11).view(3, 3)], torch.arange(11, 14))
    windows = [[0, 1, 3, 4], [2, 5], [6, 7], [8], [9, 10, 11]]
    kept = select(grid_context(scores, grids, 5), window=2)
    assert kept == [2 + i for i in (0, 2, 4, 7, 10)]
    assert kept == [2 + i for i in reference(scores, windows, 5)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("window", (2, 3))
def test_random_grids_match_the_restated_rule(seed, window):
    generator = torch.Generator().manual_seed(seed)
    height, width, n_left = 5, 7, 6
    n = height * width + n_left
    scores = torch.rand(n, generator=generator).round(decimals=1).tolist()  # rounding makes ties
    grids = ImageGrids([torch.arange(2, 2 + height * width).view(height, width)],
                       torch.arange(2 + height * width, 2 + n))
    windows = [[r * width + c for r in range(r0, min(r0 + window, height)) for c in range(c0, min(c0 + window, width))]
               for r0 in range(0, height, window) for c0 in range(0, width, window)]
    left = list(range(height * width, n))
    windows += [left[i:i + window * window] for i in range(0, n_left, window * window)]
    for budget in (1, 7, 13, n):
        kept = select(grid_context(scores, grids, budget), window)
        assert len(kept) == budget
        assert kept == [2 + i for i in reference(scores, windows, budget)]


@pytest.mark.parametrize("window", [1, 65, 2.0, True, "4"])
def test_window_outside_2_64_is_refused(window):
    with pytest.raises(ValueError, match=r"window_fastv option window must be an int in \[2, 64\] or null"):
        tuner.PruningConfig(method="window_fastv", keep_ratio=0.5, options={"window": window})


@pytest.mark.parametrize(("n_vision", "budget", "window"), [
    (576, 64, 3), (576, 144, 2), (576, 288, 2), (256, 26, 3), (256, 64, 2), (576, 1, 24), (10_000, 1, 64)])
def test_the_automatic_window_holds_about_one_kept_token(n_vision, budget, window):
    assert auto_window(n_vision, budget) == window


def test_the_default_window_is_automatic():
    # 16 tokens, budget 4: sqrt(16 / 4) = 2, the 2x2 windows of the first test.
    cfg = tuner.PruningConfig(method="window_fastv", keep_ratio=0.25)
    (kept,) = get_method_class("window_fastv")(cfg).select(grid_context(SCORES_4X4, grid_4x4(), 4)).kept_vision
    assert kept.tolist() == [2 + i for i in (1, 6, 11, 12)]


def test_grids_that_miss_a_vision_token_are_an_error():
    grids = ImageGrids([torch.arange(2, 17).view(3, 5)], torch.zeros(0, dtype=torch.long))  # 15 of 16 tokens
    with pytest.raises(RuntimeError, match="cover 15 positions, not exactly the row's 16 vision tokens"):
        select(grid_context(SCORES_4X4, grids, 4), window=2)


# What each tiny test image becomes (rows 0 and 1 of `tiny_vlms.make_inputs(batch=2)`): grid shapes, leftover count.
# LLaVA-NeXT: 8x8 base crop; 120x200 px -> 1x2 tiles of 8x8 unpadded to 8x14, 180x120 -> 2x1 unpadded to 12x8;
# one newline per unpadded row. OneVision: 4x4 base; 100x168 -> 1x2 tiles, 4x8 + 4 newlines; 112x112 -> 2x2 tiles,
# 8x8 downsampled past 2 crops' worth (ratio sqrt(2)) to 5x5 + 5 newlines. InternVL / Idefics3 / SmolVLM: 16-token
# tiles or sub-images (4x4): 2 + thumbnail / global and 4 + thumbnail / global. Qwen: `image_grid_thw` / merge.
EXPECTED = {
    "llava": ([(8, 8)], 0, [(8, 8)], 0),
    "llava_local": ([(8, 8)], 0, [(8, 8)], 0),
    "llava_next": ([(8, 8), (8, 14)], 8, [(8, 8), (12, 8)], 12),
    "llava_onevision": ([(4, 4), (4, 8)], 4, [(4, 4), (5, 5)], 5),
    "gemma3": ([(4, 4)], 0, [(4, 4)], 0),
    "internvl": ([(4, 4)] * 3, 0, [(4, 4)] * 5, 0),
    "idefics3": ([(4, 4)] * 3, 0, [(4, 4)] * 5, 0),
    "smolvlm": ([(4, 4)] * 3, 0, [(4, 4)] * 5, 0),
}


def family_grids(model, inputs) -> tuple[torch.Tensor, list[ImageGrids]]:
    adapter = adapter_for(model)
    vision = adapter.vision_mask(inputs["input_ids"], inputs["attention_mask"].bool())
    return vision, adapter.spec.image_grids(model.config, dict(inputs), inputs["input_ids"], vision)


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_family_grids_cover_every_vision_token_once_in_the_processors_shapes(family, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision, grids = family_grids(model, inputs)
    assert len(grids) == 2
    for row, row_grids in enumerate(grids):
        positions = torch.cat([g.flatten() for g in row_grids.grids] + [row_grids.leftover])
        assert torch.equal(positions.sort().values, vision[row].nonzero().squeeze(1))  # each exactly once
        assert torch.equal(row_grids.leftover, row_grids.leftover.sort().values)
        shapes = [tuple(g.shape) for g in row_grids.grids]
        if "image_grid_thw" in inputs:
            t, h, w = inputs["image_grid_thw"][row].tolist()
            merge = model.config.vision_config.spatial_merge_size
            assert (shapes, row_grids.leftover.numel()) == ([(h // merge, w // merge)] * t, 0)
        else:
            assert (shapes, row_grids.leftover.numel()) == EXPECTED[family][2 * row:2 * row + 2]


@pytest.mark.parametrize("family", ("llava_next", "llava_onevision"))
def test_anyres_leftover_tokens_are_the_newlines(family, loaded: Loader):
    """The model writes `image_newline` at exactly the leftover positions, and no image feature there."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    vision, grids = family_grids(model, inputs)
    embeds = tiny_vlms.unhooked_forward(model, inputs)[0]["inputs_embeds"]
    newline = model.model.image_newline
    for row, row_grids in enumerate(grids):
        is_newline = (embeds[row] == newline).all(-1)
        assert torch.equal(is_newline.nonzero().squeeze(1), row_grids.leftover)


@pytest.mark.parametrize("family", ("qwen2_vl", "qwen3_vl"))
def test_qwen_grids_follow_the_m_rope_height_and_width(family, loaded: Loader):
    """Down a grid column the M-RoPE height index rises by one, along a grid row the width index does."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    _, grids = family_grids(model, inputs)
    _, height, width = tiny_vlms.unhooked_forward(model, inputs)[0]["position_ids"][-3:]
    for row, row_grids in enumerate(grids):
        (grid,) = row_grids.grids
        h, w = height[row][grid], width[row][grid]
        assert torch.equal(h - h[:1, :1], torch.arange(grid.shape[0])[:, None].expand_as(grid))
        assert torch.equal(w - w[:1, :1], torch.arange(grid.shape[1])[None].expand_as(grid))


def test_window_fastv_hooks_hand_the_family_grids_to_the_method(loaded: Loader):
    """Through the hooks, each window of the LLaVA-NeXT base crop keeps its share: the grids really arrive."""
    model, processor = loaded("llava_next", "sdpa")
    inputs = tiny_vlms.make_inputs("llava_next", processor)
    _, (grids,) = family_grids(model, inputs)
    cfg = tuner.PruningConfig(method="window_fastv", layer=2, budget=46, options={"window": 4})
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
    kept = set(handle.last_kept[0].tolist())
    base = grids.grids[0]  # 8x8 -> four 4x4 windows of 16 tokens; 46 of 184 tokens is a quarter: 4 each
    for r in (0, 4):
        for c in (0, 4):
            assert len(kept & set(base[r:r + 4, c:c + 4].flatten().tolist())) == 4
    assert handle.requests[0].n_kept_vision == [46]


def test_a_search_space_can_list_window_fastv_with_its_default_window():
    """A space that does not search the window runs window_fastv with the automatic window; one that names it
    draws it from the method's default range, as `window_fastv.window`."""
    data = {"model": "m", "tasks": ["dart_shapes"], "methods": ["window_fastv"], "layer": 2,
            "keep_ratio": {"low": 0.1, "high": 0.5}}
    trial = optuna.create_study().ask()
    cfg = parse_space(data, "test.yaml").suggest(trial)
    assert cfg.method == "window_fastv" and cfg.options == {"window": None}
    assert get_method_class(cfg.method)(cfg).options == {"window": None}
    searched = parse_space({**data, "options": {"window_fastv": ["window"]}}, "test.yaml")
    trial = optuna.create_study().ask()
    cfg = searched.suggest(trial)
    assert 2 <= cfg.options["window"] <= 6 and trial.params["window_fastv.window"] == cfg.options["window"]
