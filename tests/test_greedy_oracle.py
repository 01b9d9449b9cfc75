"""The fast greedy selections of DivPrune and CDPruner keep exactly the sets the slow step-by-step reference keeps
(`greedy_oracle`): random rows, exact duplicates and ties, batches of rows with different vision counts, LLaVA-sized
rows (where the CPU Gram matrix is computed by panels), and the CPU loop picks what the tensor loop picks."""

import math

import pytest
import torch
from greedy_oracle import cdpruner_kept, divprune_kept

import tuner
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.cdpruner import _map_steps_numpy, _map_steps_torch
from tuner.pruning.ties import row_cosine, tie_tolerance

WIDTH = 48
METHODS = [("divprune", {}), ("cdpruner", {}), ("cdpruner", {"theta": 0.5, "negate_relevance": True})]


def vision_rows(n: int, generator: torch.Generator, kind: str, width: int = WIDTH) -> torch.Tensor:
    """n vision states: plain random, with exact duplicates (every 4th token one vector, two more copies of
    token 1), or on a few directions only (many exact ties in distance and gains)."""
    tokens = torch.randn(n, width, generator=generator)
    if kind == "duplicates":
        tokens[::4] = torch.randn(width, generator=generator)
        if n > 1:
            tokens[n // 2] = tokens[n - 1] = tokens[1]
    elif kind == "few_directions":
        directions = torch.randn(3, width, generator=generator)
        scales = torch.rand(n, 1, generator=generator) + 0.5  # cosine ignores the norm: exact ties of direction
        tokens = directions[torch.randint(0, 3, (n,), generator=generator)] * scales
    return tokens


def context(rows: list[torch.Tensor], budgets: list[int], generator: torch.Generator) -> SelectionContext:
    """Left-padded rows of 2 text tokens, the row's vision tokens, 3 instruction tokens."""
    length, width = max(len(r) for r in rows) + 5, rows[0].shape[1]
    hidden = torch.zeros(len(rows), length, width)
    vision = torch.zeros(len(rows), length, dtype=torch.bool)
    attention = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        start = length - len(tokens) - 5
        text = torch.randn(5, width, generator=generator)
        hidden[row, start:] = torch.cat([text[:2], tokens, text[2:]])
        vision[row, start + 2:start + 2 + len(tokens)] = True
        attention[row, start:] = True
    return SelectionContext(hidden_states=hidden, vision_mask=vision, attention_mask=attention,
                            input_ids=torch.zeros(len(rows), length, dtype=torch.long), budgets=budgets,
                            final_norm=torch.nn.Identity())


def cases(seed: int, kind: str) -> tuple[SelectionContext, torch.Generator]:
    """A batch of 1 to 3 rows of 1 to 40 vision tokens, each with a budget from 1 to its count plus 2."""
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 4, (), generator=generator))
    counts = torch.randint(1, 41, (batch,), generator=generator).tolist()
    rows = [vision_rows(n, generator, kind) for n in counts]
    budgets = [int(torch.randint(1, n + 3, (), generator=generator)) for n in counts]
    return context(rows, budgets, generator), generator


def oracle(method: str, ctx: SelectionContext, **options) -> list[list[int]]:
    if method == "divprune":
        return divprune_kept(ctx)
    return cdpruner_kept(ctx, options.get("theta"), options.get("negate_relevance", False))


def kept(method: str, ctx: SelectionContext, **options) -> list[list[int]]:
    selector = get_method_class(method)(tuner.PruningConfig(method=method, keep_ratio=0.5, options=options))
    return [k.tolist() for k in selector.select(ctx).kept_vision]


@pytest.mark.parametrize("kind", ("random", "duplicates", "few_directions"))
def test_divprune_keeps_the_step_by_step_sets(kind):
    for seed in range(40):
        ctx, _ = cases(seed, kind)
        assert kept("divprune", ctx) == divprune_kept(ctx), f"seed {seed}"


@pytest.mark.parametrize("theta, negate", [(None, False), (0.5, False), (0.0, True)])
@pytest.mark.parametrize("kind", ("random", "duplicates", "few_directions"))
def test_cdpruner_keeps_the_step_by_step_sets(kind, theta, negate):
    for seed in range(40):
        ctx, _ = cases(seed, kind)
        assert kept("cdpruner", ctx, theta=theta, negate_relevance=negate) == cdpruner_kept(ctx, theta, negate), \
            f"seed {seed}"


@pytest.mark.parametrize("method, options", METHODS)
def test_llava_sized_rows_keep_the_step_by_step_sets_alone_and_in_a_padded_batch(method, options):
    """Rows of 576 and 300 tokens at width 256 (the CPU Gram matrix by panels) with exact duplicates, and a row of
    few directions (gains reach rounding noise, where any changed bit changes a pick)."""
    generator = torch.Generator().manual_seed(3)
    rows = [vision_rows(576, generator, "duplicates", 256), vision_rows(300, generator, "random", 256),
            vision_rows(400, generator, "few_directions", 256)]
    for budgets in ([64, 192, 32], [192, 17, 128]):
        batch = context(rows, budgets, generator)
        chosen = kept(method, batch, **options)
        assert chosen == oracle(method, batch, **options), budgets
        for row, budget in enumerate(budgets):
            alone = context(rows[row:row + 1], budgets[row:row + 1], generator)
            assert kept(method, alone, **options) == oracle(method, alone, **options), (row, budget)
            assert len(set(chosen[row])) == budget and chosen[row] == sorted(chosen[row])  # original order


@pytest.mark.parametrize("kind", ("random", "duplicates", "few_directions"))
def test_cdpruner_numpy_loop_picks_what_the_tensor_loop_picks(kind):
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        batch = int(torch.randint(1, 4, (), generator=generator))
        width = int(torch.randint(2, 70, (), generator=generator))
        unit = torch.nn.functional.normalize(
            torch.stack([vision_rows(width, generator, kind) for _ in range(batch)]), dim=-1)
        valid = torch.ones(batch, width, dtype=torch.bool)
        valid[1:, :width // 3] = False  # left padding
        similarity = row_cosine(unit, valid)
        weights = torch.rand(batch, width, generator=generator) * valid
        gains = (torch.diagonal(similarity, dim1=1, dim2=2) * weights * weights).masked_fill(~valid, -math.inf)
        tolerance = tie_tolerance(gains.amax(1).clamp_min(torch.finfo(torch.float32).tiny), gains)
        steps = int(valid.sum(1).min())
        expected = _map_steps_torch(similarity, weights, gains.clone(), tolerance, steps)
        picks = _map_steps_numpy(similarity.numpy(), weights.numpy(), gains.numpy(), tolerance.numpy()[:, 0], steps)
        assert torch.equal(torch.from_numpy(picks), expected), f"seed {seed}"
