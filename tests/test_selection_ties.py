"""Greedy selections decided by position, not by rounding: a row keeps the same tokens alone and in a left-padded
batch when its tokens hold exact duplicates (LLaVA-NeXT's repeated `image_newline`) and mutual nearest
neighbours, and the tie rule itself picks the earliest of equal scores (`tuner.pruning.ties`)."""

import pytest
import torch

import tuner
from tuner.pruning import get_method_class
from tuner.pruning.base import SelectionContext
from tuner.pruning.methods.divprune import max_min_order
from tuner.pruning.ties import PANEL_ROWS, earliest_best, row_cosine, symmetric_gram

WIDTH = 256  # wide enough for float32 matmuls to round differently by shape
PREFIX, SUFFIX = 2, 3  # text tokens around each row's image
# Draws of `vision_tokens` (12 and 6 tokens): 6 and 34 flip CDPruner's picks, 66 DivPrune's, under a batched,
# unsymmetrised similarity with argmax ties (the code before `tuner.pruning.ties`); 0-2 are ordinary draws.
SEEDS = (0, 1, 2, 6, 34, 66)


def vision_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """n vision states: every 5th one the same vector (a newline), a tight cluster, and an isolated pair of mutual
    nearest neighbours whose distance is the largest nearest-neighbour distance (DivPrune's first pick ties)."""
    tokens = torch.randn(n, WIDTH, generator=generator)
    tokens[::5] = torch.randn(WIDTH, generator=generator)
    centre = torch.randn(WIDTH, generator=generator)
    cluster = range(1, n, 5)
    tokens[1::5] = centre + 0.05 * torch.randn(len(cluster), WIDTH, generator=generator)
    pivot = torch.randn(WIDTH, generator=generator)
    tokens[3], tokens[n - 2] = pivot, pivot + 0.7 * torch.randn(WIDTH, generator=generator)
    return tokens


def batch_context(rows: list[torch.Tensor], budgets: list[int]) -> SelectionContext:
    """Rows of `PREFIX` text, the row's vision tokens, `SUFFIX` text, left-padded to the longest."""
    length = max(len(r) for r in rows) + PREFIX + SUFFIX
    text = torch.randn(PREFIX + SUFFIX, WIDTH, generator=torch.Generator().manual_seed(100))
    hidden = torch.zeros(len(rows), length, WIDTH)
    vision = torch.zeros(len(rows), length, dtype=torch.bool)
    attention = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        start = length - len(tokens) - PREFIX - SUFFIX
        hidden[row, start:] = torch.cat([text[:PREFIX], tokens, text[PREFIX:]])
        vision[row, start + PREFIX:start + PREFIX + len(tokens)] = True
        attention[row, start:] = True
    return SelectionContext(hidden_states=hidden, vision_mask=vision, attention_mask=attention,
                            input_ids=torch.zeros(len(rows), length, dtype=torch.long), budgets=budgets,
                            final_norm=torch.nn.Identity())


@pytest.mark.parametrize("method", ("divprune", "cdpruner"))
def test_batch_keeps_what_each_row_keeps_alone_among_duplicates_and_mutual_neighbours(method):
    selector = get_method_class(method)(tuner.PruningConfig(method=method, keep_ratio=0.3))
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        rows = [vision_tokens(12, generator), vision_tokens(6, generator)]
        budgets = [4, 2]
        batch = selector.select(batch_context(rows, budgets)).kept_vision
        for row, tokens in enumerate(rows):
            (alone,) = selector.select(batch_context([tokens], [budgets[row]])).kept_vision
            padding = len(rows[0]) - len(tokens)
            assert (batch[row] - padding).tolist() == alone.tolist(), f"seed {seed}, row {row}"


def test_similarity_is_per_row_symmetric_and_independent_of_padding():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, WIDTH, generator=generator)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    similarity = row_cosine(features, valid)
    assert torch.equal(similarity, similarity.transpose(1, 2))
    assert torch.equal(similarity.diagonal(dim1=1, dim2=2)[0], torch.ones(5))
    assert torch.equal(similarity[1, 2:, 2:], row_cosine(features[1:, 2:], valid[1:, 2:])[0])
    assert not similarity[1, :2].any() and not similarity[1, :, :2].any()


def test_ties_within_rounding_go_to_the_earliest_token():
    scores = torch.tensor([[0.3, 0.5, 0.5 + 1e-7, 0.2], [float("-inf"), 0.1, 0.9, 0.9]])
    assert earliest_best(scores).tolist() == [1, 2]
    assert earliest_best(torch.tensor([[0.5, 0.5 + 1e-3]])).tolist() == [1]  # a real difference is not a tie


def test_exact_duplicates_are_picked_in_position_order():
    newline = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    tokens = torch.stack([newline, -newline, newline, newline])  # 0, 2, 3 identical; 1 opposite
    order = max_min_order(tokens[None], torch.ones(1, 4, dtype=torch.bool), [4])
    assert order[0].tolist()[:2] in ([0, 1], [1, 0]) and order[0].tolist()[2:] == [2, 3]


@pytest.mark.parametrize("count, width", [(2 * PANEL_ROWS, 8), (2 * PANEL_ROWS + 1, 48), (576, 1024), (729, 64)])
def test_panel_gram_has_the_bits_of_the_whole_symmetrised_product(count, width):
    """On CPU `symmetric_gram` mirrors row panels of the upper triangle: that is today's `(S + S.T) / 2` only while
    the BLAS computes a panel's entries as it computes them in the whole product, and that product is symmetric."""
    unit = torch.nn.functional.normalize(torch.randn(count, width, generator=torch.Generator().manual_seed(count)),
                                         dim=-1)
    whole = unit @ unit.T
    assert torch.equal(symmetric_gram(unit), (whole + whole.T) / 2)
