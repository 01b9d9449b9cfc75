"""`ScoredMethod`: a method that is only its score keeps each row's top-budget vision tokens, ties to the earlier
position, in original order, never a text or padding token; and the documented example method runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from tuner.config import catalog
from tuner.pruning import Needs, PruningMethod
from tuner.pruning.base import SelectionContext, top_vision


def _ctx(vision: list[list[bool]], budgets: list[int], *, padding: list[int] | None = None) -> SelectionContext:
    mask = torch.tensor(vision)
    attention = torch.ones_like(mask)
    for row, n in enumerate(padding or []):
        attention[row, :n] = False
    return SelectionContext(hidden_states=torch.zeros(*mask.shape, 4), vision_mask=mask & attention,
                            attention_mask=attention, input_ids=torch.zeros(mask.shape, dtype=torch.long),
                            budgets=budgets, final_norm=torch.nn.Identity())


def test_the_top_scores_of_vision_tokens_only_in_original_order() -> None:
    ctx = _ctx([[False, True, True, True, False, True]], [2])
    scores = torch.tensor([[9.0, 1.0, 5.0, 2.0, 8.0, 7.0]])  # the text tokens score highest: never kept
    assert top_vision(scores, ctx)[0].tolist() == [2, 5]


def test_ties_go_to_the_earlier_position_and_a_large_budget_keeps_all() -> None:
    ctx = _ctx([[True, True, True, True], [False, True, True, False]], [2, 5])
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, -torch.inf, -torch.inf, 9.0]])
    kept = top_vision(scores, ctx)
    assert kept[0].tolist() == [1, 2] and kept[1].tolist() == [1, 2]


def test_padding_is_never_kept_and_rows_are_independent() -> None:
    scores = torch.tensor([[5.0, 5.0, 1.0, 2.0, 3.0], [0.0, 4.0, 1.0, 2.0, 3.0]])
    batch = _ctx([[True, True, True, True, True], [False, True, True, True, True]], [2, 2], padding=[2, 0])
    alone = _ctx([[False, True, True, True, True]], [2])
    kept = top_vision(scores, batch)
    assert kept[0].tolist() == [3, 4]  # the padding slots 0-1 hold the highest scores
    assert kept[1].tolist() == top_vision(scores[1:], alone)[0].tolist() == [1, 4]


def test_the_documented_example_method_runs(monkeypatch) -> None:
    monkeypatch.setattr(catalog, "_CLASSES", dict(catalog._CLASSES))  # "loudest" is registered for this test only
    text = (Path(__file__).resolve().parent.parent / "docs" / "pruning.md").read_text()
    example = re.search(r"### Writing a method.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "docs/pruning.md", "exec"), namespace)  # registers "loudest"
    method = namespace["Loudest"]
    assert method.needs == Needs(keys=True) and method.reads_previous_layer(None)
    from tuner.config import PruningConfig
    config = PruningConfig(method="loudest", keep_ratio=0.5, layer=2, options={"p": 1.0})
    ctx = _ctx([[False, True, True, True, True]], [2])
    ctx.keys = torch.tensor([[[9.0], [1.0], [-4.0], [2.0], [3.0]]])
    assert method(config).select(ctx).kept_vision[0].tolist() == [2, 4]


def test_the_old_needs_flags_still_work_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="needs_\\* flags are deprecated"):
        class Old(PruningMethod):
            name = "old_flags"
            needs_last_row_attention = True
            needs_image_grids = True
    assert Old.needs == Needs(last_row_attention=True, image_grids=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class New(PruningMethod):
            name = "new_needs"
            needs = Needs(keys=True)
    assert New.needs.previous_layer() and not Needs().previous_layer()
