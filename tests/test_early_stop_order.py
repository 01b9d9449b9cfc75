"""The order of a trial's measurements under early stopping, on the embedded model: accuracy first (so adaptive
rounds can stop a dominated trial's latency), except with dominance, where a trial the floor does not stop at its
first look is timed there, so that the evaluation can stop below a faster stored point; and a trial stopped below
the floor is timed in one round."""

from __future__ import annotations

import time

import pytest

from tuner import PruningConfig
from tuner.config.workload import Workload
from tuner.evaluation import shapes
from tuner.measure.early_stop import EarlyStopping
from tuner.measure.trial import STOP_ACCURACY, TrialMeasurer

CONFIG = PruningConfig(method="dart", layer=2, keep_ratio=0.25)
ROUNDS = Workload(repeats=4, new_tokens=2, warmup=0, tolerance=0.05, min_repeats=3)  # adaptive: 3 to 4 rounds


@pytest.fixture(scope="module")
def setup() -> tuple:
    """The embedded model and 12 documents (3 chunks of 4)."""
    from tuner.evaluation.tasks import load_tasks
    from tuner.models.loading import load_model

    loaded = load_model("embedded:tiny-llava-shapes", dtype="float32", device="cpu")
    return loaded, load_tasks([shapes.TASK_NAME], subset_size=12, seed=0)


def _measurer(setup: tuple, dominance: bool) -> tuple[TrialMeasurer, list[int]]:
    """A measurer whose progress callback counts the documents answered so far (in `done[0]`)."""
    loaded, tasks = setup
    measurer = TrialMeasurer(loaded, tasks, ROUNDS, batch_size=4,
                             early_stopping=EarlyStopping(4, "confident", 0.95, dominance))
    done = [0]
    measurer.on_request = lambda n: done.__setitem__(0, done[0] + n)
    return measurer, done


def test_dominance_measures_latency_at_the_first_look_and_stops_below_a_faster_point(setup: tuple) -> None:
    """The best stored accuracy is asked for after the first chunk, at the candidate's speed-up, and a stored point
    above any bound (1.01) stops the evaluation there, with full latency rounds kept out of its eval seconds."""
    measurer, done = _measurer(setup, dominance=True)
    asked: list[tuple[str, int]] = []

    def best_accuracy(speedup: float) -> float:
        asked.append(("accuracy", done[0]))
        return 1.01

    started = time.perf_counter()
    record = measurer.measure(CONFIG, accuracy_floor=0.0, best_accuracy=best_accuracy,
                              best_speedup=lambda accuracy: asked.append(("speedup", done[0])))
    wall = time.perf_counter() - started
    assert asked == [("accuracy", 4)]  # latency before the rest of the evaluation, so no speed-up to beat
    assert record.stopped_early and record.stop_rule == "confident-dominated" and record.n_samples == 4
    assert record.prefill_repeats >= 3 and record.latency_stop != STOP_ACCURACY
    assert "of a stored, faster trial" in record.stop_reason
    assert 0 < record.eval_seconds and record.eval_seconds + record.latency_seconds <= wall  # no second counted twice
    floor_first = _measurer(setup, dominance=True)[0].measure(CONFIG, accuracy_floor=1.01,
                                                              best_accuracy=best_accuracy)
    assert floor_first.stop_rule == "confident" and floor_first.prefill_repeats == 1  # stopped before any latency
    assert asked == [("accuracy", 4)]


def test_without_dominance_accuracy_comes_first_and_a_floor_stop_gets_one_round(setup: tuple) -> None:
    """Dominance off: the speed-up to beat is asked for after all 12 documents, and the stored accuracy never; a
    floor no trial can reach stops after 4 documents, timed in one round since it decides nothing."""
    measurer, done = _measurer(setup, dominance=False)
    asked: list[tuple[str, int]] = []
    record = measurer.measure(CONFIG, accuracy_floor=0.0,
                              best_accuracy=lambda speedup: asked.append(("accuracy", done[0])),
                              best_speedup=lambda accuracy: asked.append(("speedup", done[0])))
    assert asked == [("speedup", 12)] and not record.stopped_early and record.stop_rule is None
    assert record.prefill_repeats >= 3
    stopped = measurer.measure(CONFIG, accuracy_floor=1.01)
    assert stopped.stopped_early and stopped.stop_rule == "confident" and stopped.n_samples == 4
    assert stopped.prefill_repeats == 1 and stopped.latency_stop == STOP_ACCURACY
    assert stopped.accuracy == stopped.accuracy_upper_bound < 1.01
