"""The typed trial record: what a worker stores reads back equal through a real SQLite storage, attributes of a
newer version are kept, a newer record schema is refused in one line, and a study written before the record
existed (tests/fixtures/study_v0.db) reads through the record, the Pareto front, the front table and export."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

from tuner.cli import app
from tuner.config import PruningConfig
from tuner.results import pareto_trials
from tuner.results.export import Rule, choose_trial, preset_from_trial
from tuner.results.record import (
    CONFIRMATION_ATTR,
    DIRECTIONS,
    RECORD_SCHEMA,
    RECORD_SCHEMA_ATTR,
    RecordSchemaError,
    TrialRecord,
)
from tuner.results.tables import pareto_table

FIXTURE = Path(__file__).parent / "fixtures" / "study_v0.db"
optuna.logging.set_verbosity(optuna.logging.WARNING)

MEASURED = dict(metrics={"dart_shapes": {"exact_match": 0.75}}, n_samples=4,
                accuracy_by_category={"dart_shapes/color": 1.0, "dart_shapes/count": 0.5},
                samples=[[0, 1.0, 26], [3, 0.0, 26], [5, 1.0, 26], [9, 1.0, 26]], sample_tasks=[["dart_shapes", 4]],
                eval_seconds=1.25, kept_vision_mean=26.0, kept_vision_min=26.0, kept_vision_max=26.0,
                vision_mean=256.0, keep_ratio_achieved=0.1015625, accuracy_low=0.3, accuracy_high=0.95,
                accuracy_interval="wilson", accuracy_confidence=0.95, prefill_ms=31.5, prefill_iqr_ms=1.5,
                prefill_repeats=5, prefill_ms_low=30.0, prefill_ms_high=33.0, prefill_ms_coverage=0.9375,
                decode_ms_per_token=10.5, decode_iqr_ms=0.25, end_to_end_ms=70.0, peak_memory_bytes=123456,
                baseline_prefill_ms_same_run=50.0, speedup_same_run=1.5873, speedup_low=1.4, speedup_high=1.7,
                latency_noisy=False, prefill_flops=811920000, kv_cache_bytes=279552, flops_ratio=0.313,
                latency_input_tokens=258, latency_input_kept_vision=26, feature_cache_hits=2,
                feature_cache_misses=0, feature_cache_evictions=0, feature_cache_bypassed=0, feature_cache_entries=2,
                feature_cache_bytes=2625536)
PAIRED = dict(accuracy_diff=-0.25, accuracy_diff_low=-0.6, accuracy_diff_high=0.1, accuracy_diff_method="newcombe",
              mcnemar_p=0.5, discordant_improved=0, discordant_worsened=1, n_paired=4)
DART = PruningConfig(method="dart", layer=2, keep_ratio=0.1, options={"n_image_pivots": 4, "n_text_pivots": 4})

BASELINE = TrialRecord(role="baseline", accuracy=1.0, **{**MEASURED, "prefill_ms": 50.0, "speedup_same_run": 1.0,
                                                          "latency_noisy": True, "latency_warning": "3 rounds"})
PRUNED = TrialRecord(config=DART, role="paper_default", accuracy=0.75, **MEASURED, **PAIRED)
STOPPED = TrialRecord(config=dataclasses.replace(DART, keep_ratio=0.05), accuracy=0.625, **MEASURED, **PAIRED,
                      stopped_early=True, stop_reason="stopped after 4 of 8 documents", accuracy_partial=0.25,
                      accuracy_upper_bound=0.625)


def _stored(tmp_path: Path, records: list[TrialRecord], confirmation: dict | None = None) -> optuna.Study:
    """A SQLite study holding `records` as complete trials (JSON through the real storage), read back."""
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(storage=storage, study_name="r", directions=list(DIRECTIONS))
    for record in records:
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, user_attrs=record.to_attrs(),
                                                  values=[record.accuracy, record.prefill_ms]))
    if confirmation is not None:
        study.set_user_attr(CONFIRMATION_ATTR, confirmation)
    return optuna.load_study(study_name="r", storage=storage)


@pytest.mark.parametrize("record", [BASELINE, PRUNED, STOPPED], ids=["baseline", "pruned", "stopped"])
def test_a_stored_record_reads_back_equal(record, tmp_path) -> None:
    """Catches a field that to_attrs drops or renames, or that from_trial does not read back (after JSON)."""
    (trial,) = _stored(tmp_path, [record]).trials
    assert trial.user_attrs[RECORD_SCHEMA_ATTR] == RECORD_SCHEMA
    assert TrialRecord.from_trial(trial) == record
    assert TrialRecord.from_trial(trial).to_attrs() == trial.user_attrs


def test_a_confirmed_record_reads_its_confirmation_from_the_study(tmp_path) -> None:
    """The confirmation run's numbers live in the study (a finished trial's attributes cannot change): read with
    it, the record carries them; the trial's own attributes stay as stored."""
    numbers = {"prefill_ms": 30.5, "speedup": 1.6, "speedup_low": 1.5, "speedup_high": 1.7, "accuracy": 0.8}
    study = _stored(tmp_path, [BASELINE, PRUNED], {"repeats": 20, "trials": {"1": numbers}})
    base, pruned = study.trials
    assert TrialRecord.from_trial(pruned, study.user_attrs[CONFIRMATION_ATTR]) == dataclasses.replace(
        PRUNED, confirmed=numbers)
    assert TrialRecord.from_trial(base, study.user_attrs[CONFIRMATION_ATTR]) == BASELINE
    assert CONFIRMATION_ATTR not in TrialRecord.from_trial(pruned, study.user_attrs[CONFIRMATION_ATTR]).to_attrs()


def test_an_attribute_of_a_newer_version_is_kept(tmp_path) -> None:
    """A trial written by a later dart-tuner of the same record schema with one more attribute: it reads, the
    attribute is kept (and written back), and the readers built on the record still work."""
    newer = dataclasses.replace(PRUNED, unknown={"energy_joules": 0.42})
    study = _stored(tmp_path, [BASELINE, newer])
    record = TrialRecord.from_trial(study.trials[1])
    assert record.unknown == {"energy_joules": 0.42} and record.to_attrs()["energy_joules"] == 0.42
    assert dataclasses.replace(record, unknown={}) == PRUNED
    assert [t.number for t in pareto_trials(study)] == [1, 0]
    Console(width=250, record=True).print(pareto_table(study))
    assert preset_from_trial(study, choose_trial(study, Rule(trial=1))).config == DART


def test_a_newer_record_schema_is_refused_in_one_line(tmp_path) -> None:
    """Catches a reader that guesses at a future schema's meaning: the record and the CLI refuse it, naming the
    trial and the versions, in one line and without a traceback."""
    future = {**PRUNED.to_attrs(), RECORD_SCHEMA_ATTR: RECORD_SCHEMA + 1}
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(storage=storage, study_name="r", directions=list(DIRECTIONS))
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, user_attrs=future, values=[0.75, 31.5]))
    with pytest.raises(RecordSchemaError, match=f"trial 0 was stored with trial record schema {RECORD_SCHEMA + 1}"):
        TrialRecord.from_trial(study.trials[0])
    result = CliRunner().invoke(app, ["export", "--study", "r", "--storage", storage, "--trial", "0",
                                      "--output", str(tmp_path / "p.yaml")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit | None)
    message = result.output.strip()
    assert f"record schema {RECORD_SCHEMA + 1}" in message and "upgrade dart-tuner" in message
    assert "Traceback" not in message and not (tmp_path / "p.yaml").exists()


def _raw_attrs(path: Path) -> dict[int, dict]:
    """Every trial's user attributes straight from the SQLite file (JSON values), without Optuna."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT t.number, a.key, a.value_json FROM trial_user_attributes a "
                          "JOIN trials t ON t.trial_id = a.trial_id").fetchall()
    attrs: dict[int, dict] = {}
    for number, key, value in rows:
        attrs.setdefault(number, {})[key] = json.loads(value)
    return attrs


def test_a_study_written_before_the_record_reads_through_it(tmp_path) -> None:
    """tests/fixtures/study_v0.db was tuned and confirmed by the code before this record (record schema 0): every
    trial reads, each field equals the value stored in the file, and the front, its table and export show them."""
    path = tmp_path / "v0.db"
    shutil.copy(FIXTURE, path)
    raw = _raw_attrs(path)
    study = optuna.load_study(study_name="v0", storage=f"sqlite:///{path}")
    confirmation = study.user_attrs[CONFIRMATION_ATTR]
    records = {t.number: TrialRecord.from_trial(t, confirmation) for t in study.trials}
    assert all(RECORD_SCHEMA_ATTR not in attrs for attrs in raw.values())  # written before the record existed
    for number, record in records.items():
        assert record.unknown == {}, number  # every attribute today's code wrote is a field
        for key, value in raw[number].items():
            if key == "config":
                assert (record.config.to_dict() if record.config else None) == value
            elif key != "config_schema":
                assert getattr(record, key) == value, (number, key)
    assert records[0].is_baseline and records[1].role == "paper_default" and records[1].stopped_early
    assert records[4].duplicate_of == 1 and records[4].accuracy is None
    assert records[3].confirmed == confirmation["trials"]["3"] and records[2].confirmed is None
    front = pareto_trials(study)
    assert [t.number for t in front] == [3, 0]  # the stopped trials are infeasible, trial 2 is dominated
    assert [t.values for t in front] == [[raw[3]["accuracy"], raw[3]["prefill_ms"]],
                                         [raw[0]["accuracy"], raw[0]["prefill_ms"]]]
    console = Console(width=300, record=True)
    console.print(pareto_table(study))
    text = console.export_text()
    assert f"{raw[3]['accuracy']:.3f}" in text and f"{raw[3]['prefill_ms']:.1f}" in text
    assert f"{confirmation['trials']['3']['prefill_ms']:.1f} ms" in text
    preset = preset_from_trial(study, choose_trial(study, Rule(min_relative_accuracy=0.7)))
    assert preset.provenance["trial"] == 3 and preset.config == records[3].config
    assert preset.metrics["prefill_ms_median"] == raw[3]["prefill_ms"]
    assert preset.metrics["speedup_low"] == raw[3]["speedup_low"]
    assert preset.metrics["accuracy_diff"] == raw[3]["accuracy_diff"]
    assert preset.metrics["kept_vision_mean"] == raw[3]["kept_vision_mean"]
    assert preset.metrics["confirmed"] == confirmation["trials"]["3"]
