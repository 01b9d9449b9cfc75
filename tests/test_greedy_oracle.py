"""The vectorised greedy selections of DivPrune and CDPruner keep exactly the sets the step-by-step versions kept
(`greedy_oracle`): random rows, exact duplicates and ties, batches of rows with different vision counts."""

import pytest
import torch
from greedy_oracle import cdpruner_kept, divprune_kept

import tuner
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext

WIDTH = 48


def vision_rows(n: int, generator: torch.Generator, kind: str) -> torch.Tensor:
    """n vision states: plain random, with exact duplicates (every 4th token one vector, two more copies of
    token 1), or on a few directions only (many exact ties in distance and gains)."""
    tokens = torch.randn(n, WIDTH, generator=generator)
    if kind == "duplicates":
        tokens[::4] = torch.randn(WIDTH, generator=generator)
        if n > 1:
            tokens[n // 2] = tokens[n - 1] = tokens[1]
    elif kind == "few_directions":
        directions = torch.randn(3, WIDTH, generator=generator)
        scales = torch.rand(n, 1, generator=generator) + 0.5  # cosine ignores the norm: exact ties of direction
        tokens = directions[torch.randint(0, 3, (n,), generator=generator)] * scales
    return tokens


def context(rows: list[torch.Tensor], budgets: list[int], generator: torch.Generator) -> SelectionContext:
    """Left-padded rows of 2 text tokens, the row's vision tokens, 3 instruction tokens."""
    length = max(len(r) for r in rows) + 5
    hidden = torch.zeros(len(rows), length, WIDTH)
    vision = torch.zeros(len(rows), length, dtype=torch.bool)
    attention = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        start = length - len(tokens) - 5
        text = torch.randn(5, WIDTH, generator=generator)
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


@pytest.mark.parametrize("method, oracle", [("divprune", divprune_kept), ("cdpruner", cdpruner_kept)])
def test_a_full_llava_sized_row_keeps_the_step_by_step_set(method, oracle):
    generator = torch.Generator().manual_seed(3)
    rows = [vision_rows(576, generator, "duplicates")]
    for budget in (64, 192):
        ctx = context(rows, [budget], generator)
        assert kept(method, ctx) == oracle(ctx)
