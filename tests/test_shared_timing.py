"""Shared latency measurements: a configuration whose prefill does the same work as a stored trial's (same
inputs, workload, stack, layers and kept counts) takes over that trial's timing and says whose; anything that
changes the work, or a selection that costs more, is timed afresh."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from tuner.config import PruningConfig
from tuner.config.workload import Workload, WorkloadError
from tuner.evaluation.tasks import load_tasks
from tuner.measure.shared_timing import TIMING_FIELDS, reusable
from tuner.measure.trial import TrialMeasurer
from tuner.models.loading import load_model
from tuner.results.record import TrialRecord
from tuner.search.space import parse_space
from tuner.search.study import Tuner

TASK = "dart_shapes"
WORKLOAD = dict(new_tokens=2, repeats=2, warmup=0)
# Record fields that are the configuration's own, never taken over from another trial's timing.
OWN_FIELDS = {
    "config", "role", "failure", "failure_type", "duplicate_of", "requeued_from", "accuracy", "metrics",
    "n_samples", "accuracy_by_category", "samples", "sample_tasks", "eval_seconds", "kept_vision_mean",
    "kept_vision_min", "kept_vision_max", "vision_mean", "keep_ratio_achieved", "stage_kept_vision_mean",
    "accuracy_low", "accuracy_high", "accuracy_interval", "accuracy_confidence", "accuracy_diff",
    "accuracy_diff_low", "accuracy_diff_high", "accuracy_diff_method", "mcnemar_p", "discordant_improved",
    "discordant_worsened", "n_paired", "stopped_early", "stop_reason", "accuracy_partial", "accuracy_upper_bound",
    "stop_rule",
    "latency_seconds", "latency_signature", "latency_reused_from", "select_ms", "feature_cache_hits",
    "feature_cache_misses", "feature_cache_evictions", "feature_cache_bypassed", "feature_cache_entries",
    "feature_cache_bytes", "confirmed", "unknown",
}


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks([TASK], subset_size=2, seed=0)


def test_every_record_field_is_timing_or_the_configurations_own() -> None:
    """Catches a new latency field that a reusing trial would silently leave empty (or an accuracy field it would
    take over from another configuration)."""
    fields = {f.name for f in dataclasses.fields(TrialRecord)}
    assert set(TIMING_FIELDS) | OWN_FIELDS == fields and not set(TIMING_FIELDS) & OWN_FIELDS


class Ledger:
    """A lookup over the records measured so far, as `StoredTimings` is over a study."""

    def __init__(self) -> None:
        self.records: list[TrialRecord] = []

    def __call__(self, signature: str):
        for number, record in enumerate(self.records):
            if record.latency_signature == signature and record.latency_reused_from is None:
                return record, f"trial {number}"
        return None

    def measure(self, measurer: TrialMeasurer, config: PruningConfig) -> TrialRecord:
        record = measurer.measure(config, stored_timing=self)
        self.records.append(record)
        return record


@pytest.fixture
def any_selection_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selections agree whatever they cost: on a busy machine one untimed selection can read several ms more than
    the stored median, and these tests are about the signature (`reusable` has its own test)."""
    monkeypatch.setattr("tuner.measure.shared_timing.SELECT_AGREEMENT", float("inf"))


def test_the_same_work_shares_one_timing_and_other_work_is_timed(model_and_tasks, any_selection_cost) -> None:
    """random and pooling keeping half at K = 2 do the same prefill work; K = 3, another keep ratio or another
    processor setting does not. Catches a signature that misses one of them (a wrong speed-up taken over)."""
    loaded, tasks = model_and_tasks
    measurer = TrialMeasurer(loaded, tasks, Workload(**WORKLOAD))
    ledger = Ledger()
    first = ledger.measure(measurer, PruningConfig(method="random", layer=2, keep_ratio=0.5))
    assert first.latency_reused_from is None and first.latency_signature and first.select_ms is not None
    same = ledger.measure(measurer, PruningConfig(method="pooling", layer=2, keep_ratio=0.5))
    assert same.latency_reused_from == "trial 0" and same.latency_signature == first.latency_signature
    assert {name: getattr(same, name) for name in TIMING_FIELDS} == {name: getattr(first, name)
                                                                     for name in TIMING_FIELDS}
    assert same.samples != first.samples or same.config != first.config  # its own accuracy, not the first's
    everything = ledger.measure(measurer, PruningConfig(method="keep_all", layer=1))
    assert ledger.measure(measurer, PruningConfig(method="keep_all", layer=3)).latency_reused_from == (
        f"trial {len(ledger.records) - 2}")  # keeping everything is the same work at any layer
    assert everything.latency_signature != first.latency_signature
    side = loaded.model.config.vision_config.image_size - 2 * loaded.model.config.vision_config.patch_size
    for other in (PruningConfig(method="random", layer=3, keep_ratio=0.5),
                  PruningConfig(method="random", layer=2, keep_ratio=0.25),
                  PruningConfig(method="random", layer=2, keep_ratio=0.5, processor={"image_size": side})):
        record = ledger.measure(measurer, other)
        assert record.latency_reused_from is None and record.latency_signature != first.latency_signature, other


def test_a_quantum_shares_near_kept_counts_and_off_shares_nothing(model_and_tasks, any_selection_cost) -> None:
    loaded, tasks = model_and_tasks
    n_vision = TrialMeasurer(loaded, tasks, Workload(**WORKLOAD)).latency_vision_tokens()
    assert n_vision >= 16
    coarse = TrialMeasurer(loaded, tasks, Workload(**WORKLOAD, kept_quantum=n_vision))
    ledger = Ledger()
    ledger.measure(coarse, PruningConfig(method="random", layer=2, budget=n_vision // 2 + 1))
    near = ledger.measure(coarse, PruningConfig(method="random", layer=2, budget=n_vision // 2 + 2))
    assert near.latency_reused_from == "trial 0"
    off = TrialMeasurer(loaded, tasks, Workload(**WORKLOAD, share_timings="off"))
    ledger = Ledger()
    ledger.measure(off, PruningConfig(method="random", layer=2, keep_ratio=0.5))
    again = ledger.measure(off, PruningConfig(method="random", layer=2, keep_ratio=0.5))
    assert again.latency_reused_from is None and again.latency_signature is None


def test_a_dearer_selection_or_a_dominated_stop_is_timed_afresh() -> None:
    stored = TrialRecord(prefill_ms=100.0, select_ms=0.5, latency_stop="tolerance")
    assert reusable(stored, 1.4) and not reusable(stored, 1.6)  # within 1% of the 100 ms prefill, or not
    assert not reusable(dataclasses.replace(stored, latency_stop="dominated"), 0.5)


@pytest.mark.parametrize(("key", "value", "culprit"), [
    ("share_timings", "everywhere", "latency.share_timings 'everywhere' is not one of off, study, storage"),
    ("kept_quantum", 0, "latency.kept_quantum must be an integer >= 1"),
])
def test_bad_sharing_settings_are_one_line(key: str, value: object, culprit: str) -> None:
    with pytest.raises(WorkloadError) as caught:
        Workload(**{key: value})
    assert str(caught.value).startswith(culprit)


def _space(study: str, share: str) -> dict:
    return {"study": study, "model": "m", "tasks": [TASK], "subset": {"size": 2, "seed": 0},
            "methods": ["random", "pooling"], "layer": [2], "keep_ratio": [0.5], "attn_implementation": "sdpa",
            "dtype": "float32", "device": "cpu", "batch_size": 2, "sampler": {"name": "grid"}, "trials": 3,
            "latency": {**WORKLOAD, "share_timings": share}}


def test_a_study_stores_whose_timing_a_trial_took_and_storage_sharing_crosses_studies(model_and_tasks, tmp_path,
                                                                                      any_selection_cost) -> None:
    """Catches the stored attribute missing (nobody could tell a reused timing from a measured one) and
    `storage` sharing that does not look beyond its own study."""
    loaded, tasks = model_and_tasks
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = Tuner(parse_space(_space("a", "study"), "a.yaml"), storage, loaded=loaded, tasks=tasks).run(3)
    pruned = [t for t in first.get_trials() if t.params.get("method")]
    assert sorted(t.user_attrs.get("latency_reused_from") is not None for t in pruned) == [False, True]
    from tuner.search.replay import measured_of
    assert sorted(measured_of(t).latency_rounds for t in pruned)[0] == 0  # bench-search counts no rounds for it
    second = Tuner(parse_space(_space("b", "storage"), "b.yaml"), storage, loaded=loaded, tasks=tasks).run(3)
    reused = [t.user_attrs.get("latency_reused_from") for t in second.get_trials() if t.params.get("method")]
    assert all(source is not None and source.startswith("study a, trial ") for source in reused), reused
    assert optuna.load_study(study_name="b", storage=storage).best_trials
