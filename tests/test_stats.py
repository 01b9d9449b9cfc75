"""The interval arithmetic of `tuner.results.stats` against values computed by hand (no model, milliseconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tuner.results import stats

Z95 = 1.959963984540054


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (0, 10, 0.0, Z95**2 / (10 + Z95**2)),  # closed form at 0 successes: z^2 / (n + z^2)
    (10, 10, 10 / (10 + Z95**2), 1.0),
    (5, 10, 0.236593, 0.763407),           # the textbook half-and-half case
    (1, 4, 0.045587, 0.699358),            # p=0.25: centre 0.372471, half-width 0.326886
])
def test_wilson_on_small_counts(successes: int, n: int, low: float, high: float) -> None:
    """Catches a Wald interval, a one-sided z, or a centre that is not pulled towards 1/2."""
    got = stats.wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_mcnemar_exact_p_on_a_hand_built_table() -> None:
    """2x2 table: 20 both right, 2 only the candidate, 9 only the baseline, 5 neither. Exact two-sided p is
    2 * P(Bin(11, 1/2) <= 2) = 2 * (1 + 11 + 55) / 2048; the concordant cells must not matter."""
    assert stats.mcnemar_exact_p(2, 9) == pytest.approx(134 / 2048, abs=1e-15)
    assert stats.mcnemar_exact_p(9, 2) == stats.mcnemar_exact_p(2, 9)
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(3, 3) == 1.0  # the two-sided tail doubled past 1 is capped
    candidate = [1] * 20 + [1] * 2 + [0] * 9 + [0] * 5
    baseline = [1] * 20 + [0] * 2 + [1] * 9 + [0] * 5
    paired = stats.paired_difference(candidate, baseline)
    assert (paired.improved, paired.worsened) == (2, 9)
    assert paired.p_value == pytest.approx(134 / 2048, abs=1e-15)
    assert paired.diff == pytest.approx((22 - 29) / 36)
    assert paired.method == "newcombe" and paired.low < paired.diff < paired.high < 0.1


def test_newcombe_phi_is_shrunk_by_half_n() -> None:
    """Table 10 / 2 / 3 / 5 (n = 20): AD - BC = 44 > n/2, so phi = (44 - 10) / sqrt(12 * 8 * 13 * 7), worked by
    hand into the square-and-add formula; an uncorrected phi (44 / ...) gives a narrower interval."""
    l1, u1 = stats.wilson_interval(12, 20)
    l2, u2 = stats.wilson_interval(13, 20)
    phi = 34 / math.sqrt(12 * 8 * 13 * 7)
    p1, p2 = 0.6, 0.65
    low = -0.05 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = -0.05 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    assert stats.newcombe_paired_interval(10, 2, 3, 5) == pytest.approx((low, high))


def test_newcombe_interval_is_antisymmetric_and_reduces_without_correlation() -> None:
    """Swapping who wins the discordant pairs mirrors the interval; with a zero margin (phi = 0) it is the
    square-and-add of the two Wilson intervals."""
    low, high = stats.newcombe_paired_interval(20, 2, 9, 5)
    mirrored = stats.newcombe_paired_interval(20, 9, 2, 5)
    assert mirrored == pytest.approx((-high, -low))
    # neither = 0 and worsened = 0: a zero margin, so phi = 0
    both, improved = 6, 4
    n = both + improved
    l1, u1 = stats.wilson_interval(10, n)
    l2, u2 = stats.wilson_interval(6, n)
    diff = 1.0 - 0.6
    expected = (diff - math.hypot(1.0 - l1, u2 - 0.6), diff + math.hypot(u1 - 1.0, 0.6 - l2))
    assert stats.newcombe_paired_interval(both, improved, 0, 0) == pytest.approx(expected)


def test_median_interval_has_its_exact_binomial_coverage() -> None:
    """5 rounds: min..max holds the median with 1 - 2/32 = 93.75% (below 95%, and says so); 20 rounds: the 6th and
    15th values, coverage 1 - 2 * P(Bin(20, 1/2) <= 5) = 0.9586."""
    assert stats.median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0, 0.9375)
    low, high, coverage = stats.median_interval([float(v) for v in range(1, 21)])
    assert (low, high) == (6.0, 15.0)
    assert coverage == pytest.approx(1 - 2 * sum(math.comb(20, j) for j in range(6)) / 2**20)
    assert stats.median_rank(20, 0.95) == 6 and stats.median_rank(5, 0.95) == 1


def test_non_binary_scores_get_a_seeded_bootstrap() -> None:
    """Fractional scores are bootstrapped, the same seed gives the same interval, and the interval holds the mean."""
    scores = [0.0, 0.25, 0.5, 1.0, 0.75, 0.5] * 5
    first, again = stats.mean_interval(scores), stats.mean_interval(scores)
    assert first == again and first.method == "bootstrap"
    assert first.value == pytest.approx(0.5) and first.low < first.value < first.high
    # the interval the hand-written percentile bootstrap stored before scipy did the resampling (seed 0, 2000
    # resamples): a switch to BCa, another seed use or another quantile rule moves these ends
    assert (first.low, first.high) == pytest.approx((0.375, 0.6166666666666667), abs=1e-12)


def test_several_tasks_average_their_means() -> None:
    """Two tasks of different sizes: the point is the mean of the task means (not of the pooled samples)."""
    scores = [1.0] * 10 + [0.0, 1.0]
    groups = ["a"] * 10 + ["b"] * 2
    interval = stats.mean_interval(scores, groups)
    assert interval.value == pytest.approx((1.0 + 0.5) / 2) and interval.method == "bootstrap"
    # resampled within each task: 'a' stays 1.0 and 'b' means 0, 0.5 or 1 (a quarter each end), so the 95% ends
    # are (1 + 0) / 2 and (1 + 1) / 2; resampling the pooled 12 would give other values
    assert (interval.low, interval.high) == pytest.approx((0.5, 1.0))


def test_fractional_paired_scores_get_a_paired_bootstrap_without_p() -> None:
    """Non-0/1 or several-task pairs: the difference of the (task-averaged) means, a seeded bootstrap of the
    per-sample differences (a constant difference has a zero-width interval), and no McNemar p."""
    baseline = [0.0, 0.25, 0.5, 1.0, 0.75, 0.5] * 5
    shifted = stats.paired_difference([b + 0.125 for b in baseline], baseline)
    assert shifted.method == "paired bootstrap" and shifted.p_value is None and shifted.improved is None
    assert (shifted.diff, shifted.low, shifted.high) == pytest.approx((0.125, 0.125, 0.125))
    candidate = [1.0, 0.0, 1.0, 1.0] + [1.0, 1.0]
    grouped = stats.paired_difference(candidate, [1.0, 1.0, 0.0, 1.0] + [0.0, 1.0], ["a"] * 4 + ["b"] * 2)
    assert grouped.method == "paired bootstrap" and grouped.p_value is None
    assert grouped.diff == pytest.approx((0.75 - 0.75 + 1.0 - 0.5) / 2) and grouped.low <= grouped.diff <= grouped.high
    assert stats.paired_difference(candidate, candidate[::-1], seed=1) == stats.paired_difference(
        candidate, candidate[::-1], seed=1)


def test_bad_input_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        stats.paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="same non-zero length"):
        stats.paired_difference([], [])
    with pytest.raises(ValueError, match="3 labels for 2 samples"):
        stats.mean_interval([1.0, 0.0], ["a", "a", "b"])
    with pytest.raises(ValueError, match="no scores"):
        stats.mean_interval([])
    with pytest.raises(ValueError, match="no samples"):
        stats.median_interval([])
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence must be in"):
        stats.mean_interval([0.25, 0.5], confidence=1.0)
    with pytest.raises(ValueError, match="discordant counts"):
        stats.mcnemar_exact_p(-1, 2)


def test_one_sided_lower_bound_is_the_low_end_of_a_wider_two_sided_interval() -> None:
    """A 97.5% one-sided bound of 0/1 scores is the low end of the 95% Wilson interval."""
    scores = [1.0] * 8 + [0.0] * 2
    assert stats.lower_bound(scores, 0.975) == pytest.approx(stats.wilson_interval(8, 10)[0])
    assert stats.lower_bound(scores, 0.5) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="confidence"):
        stats.lower_bound(scores, 1.0)


def test_agrees_with_independent_scipy_routes() -> None:
    """The same numbers by scipy routes the module does not take: the median's order statistics as quantile_test
    picks them; a task of one document (scipy refuses to resample it) as a constant shift of the other task's plain
    one-sample bootstrap; Wilson from the 0/1 scores themselves."""
    for n in range(6, 80):
        samples = [float(v) for v in np.random.default_rng(n).permutation(n)]
        low, high, _ = stats.median_interval(samples)
        expected = scipy_stats.quantile_test(samples, q=float(np.median(samples))).confidence_interval(0.95)
        assert (low, high) == (expected.low, expected.high), n
    task = np.array([0.0, 0.25, 0.5, 1.0, 0.75, 0.5] * 4)
    alone = scipy_stats.bootstrap((task,), np.mean, n_resamples=stats.BOOTSTRAP_RESAMPLES, method="percentile",
                                  rng=np.random.default_rng(stats.BOOTSTRAP_SEED)).confidence_interval
    grouped = stats.mean_interval([*task, 1.0], ["a"] * len(task) + ["b"])
    assert (grouped.low, grouped.high) == pytest.approx(((alone.low + 1) / 2, (alone.high + 1) / 2), abs=1e-12)
    scores = [1.0] * 37 + [0.0] * 13
    wilson = scipy_stats.binomtest(37, 50).proportion_ci(0.95, method="wilson")
    assert (stats.mean_interval(scores).low, stats.mean_interval(scores).high) == pytest.approx(
        (wilson.low, wilson.high), abs=1e-12)
    mcnemar = scipy_stats.binomtest(4, 4 + 15).pvalue  # two-sided, p = 1/2: the discordant pairs alone
    assert stats.paired_difference([1.0] * 4 + [0.0] * 15 + [1.0] * 30, [0.0] * 4 + [1.0] * 15 + [1.0] * 30
                                   ).p_value == pytest.approx(mcnemar, abs=1e-15)
