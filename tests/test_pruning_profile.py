"""`bench-pruning --profile`'s split of a prefill, the hooks' profiler steps, and DivPrune's two greedy loops."""

import math

import torch

from tuner.bench.pruning_profile import run_profile
from tuner.pruning.methods.divprune import _max_min_steps_numpy, _max_min_steps_torch, cosine_distances
from tuner.pruning.profiling import step
from tuner.pruning.ties import tie_tolerance


def test_steps_are_one_shared_no_op_without_a_profiler():
    assert step("select") is step("gather")
    with torch.profiler.profile() as prof, step("select"):
        torch.ones(3).sum()
    assert "dart_tuner::select" in {event.name for event in prof.events()}


def test_profile_splits_each_prefill_and_times_the_unhooked_layers_at_the_kept_length():
    rows = run_profile(methods=("random",), budgets=(32,), rounds=1, hidden=64, layers=3, layer=1)
    by_name = {row.name: row for row in rows}
    assert list(by_name) == ["no hooks", "keep_all", "random 32"]
    pruned, plain = by_name["random 32"], by_name["no hooks"]
    assert pruned.tokens_after_k == 32 + 40 and plain.tokens_after_k == 616
    assert plain.hooks_ms == plain.select_ms == plain.capture_ms == 0.0
    assert pruned.select_ms > 0 and pruned.hooks_ms > 0
    assert {"model_call", "select", "gather", "masks", "substitute"} <= set(pruned.steps_ms)
    assert pruned.after_unhooked_ms > 0
    assert math.isclose(pruned.before_ms + pruned.capture_ms + pruned.after_ms + pruned.select_ms
                        + pruned.hooks_ms + pruned.rest_ms, pruned.prefill_ms, rel_tol=1e-9)


def test_divprune_numpy_loop_picks_what_the_tensor_loop_picks():
    generator = torch.Generator().manual_seed(0)
    for seed in range(20):
        width = int(torch.randint(2, 60, (), generator=generator))
        features = torch.randn(2, width, 16, generator=generator)
        features[1, ::3] = features[1, 1]  # exact duplicates: ties decided by position
        valid = torch.ones(2, width, dtype=torch.bool)
        valid[1, width // 2:] = False
        steps = width // 2
        distance, score = cosine_distances(features, valid)
        score.masked_fill_(~valid, -math.inf)
        tolerance = tie_tolerance(1.0, score)
        expected = _max_min_steps_torch(distance.clone(), score.clone(), valid, tolerance, steps)
        picks = _max_min_steps_numpy(distance.numpy(), score.numpy(), valid.numpy(), float(tolerance[0, 0]), steps)
        assert torch.equal(torch.from_numpy(picks), expected), f"seed {seed}"
