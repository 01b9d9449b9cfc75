"""The serving workload: its vocabulary and errors, a space's `latency` section, a study tuned for each objective in
its direction (what it stores, its front, its refusal to resume at another objective)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from tuner.bench.serving import serving_runs, serving_sheet
from tuner.cli import app
from tuner.config import PruningConfig
from tuner.config.preset import PresetMismatchWarning
from tuner.config.workload import (
    OBJECTIVES,
    Workload,
    WorkloadError,
    differences,
    objective_named,
    workload_warning,
)
from tuner.evaluation.tasks import load_tasks
from tuner.measure.trial import TrialMeasurer
from tuner.measure.workload import RECORD_FIELDS
from tuner.models.loading import load_model
from tuner.pruning import apply_pruning
from tuner.results import is_baseline, pareto_trials, study_objective
from tuner.results.evidence import confirmed_text
from tuner.results.export import preset_from_trial
from tuner.results.record import TrialRecord
from tuner.results.tables import pareto_sheet
from tuner.results.trials import pareto_front
from tuner.search.confirm import confirm
from tuner.search.replay import measured_of
from tuner.search.space import SpaceError, parse_space
from tuner.search.study import Tuner, WorkloadMismatch

TASK = "dart_shapes"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_objectives_have_the_right_direction_and_unit() -> None:
    """Catches throughput minimised (a front of the slowest configurations) or a unit-less heading."""
    assert objective_named(None).name == "prefill_ms"
    assert {n: (o.direction, o.unit) for n, o in OBJECTIVES.items()} == {
        "prefill_ms": ("minimize", "ms"), "ttft_ms": ("minimize", "ms"), "e2e_ms": ("minimize", "ms"),
        "throughput": ("maximize", "tokens/s")}
    throughput = OBJECTIVES["throughput"]
    assert throughput.cost(200.0) < throughput.cost(100.0) and throughput.gain(100.0, 200.0) == 2.0
    assert OBJECTIVES["e2e_ms"].gain(100.0, 50.0) == 2.0


@pytest.mark.parametrize(("data", "culprit"), [
    ({"objective": "latency"}, "'latency'"), ({"batch_size": 0}, "latency.batch_size"),
    ({"new_tokens": 1}, "latency.new_tokens"), ({"batch_size": True}, "latency.batch_size"),
])
def test_bad_workload_is_one_line_naming_it(data: dict, culprit: str) -> None:
    with pytest.raises(WorkloadError) as caught:
        Workload(**data)
    assert culprit in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("latency", "culprit"), [
    ({"objective": "ttft"}, "latency.objective"), ({"batch_size": 0}, "latency.batch_size"),
    ({"new_tokens": 1}, "latency.new_tokens"), ({"batch": 4}, "latency"),
])
def test_bad_latency_section_names_file_and_key(latency: dict, culprit: str) -> None:
    data = {"model": "m", "tasks": [TASK], "methods": ["dart"], "layer": 2, "keep_ratio": 0.5, "latency": latency}
    with pytest.raises(SpaceError) as caught:
        parse_space(data, "serve.yaml")
    assert str(caught.value).startswith("serve.yaml: " + culprit) and "\n" not in str(caught.value)


def test_space_latency_default_keeps_todays_meaning() -> None:
    data = {"model": "m", "tasks": [TASK], "methods": ["dart"], "layer": 2, "keep_ratio": 0.5}
    space = parse_space(data, "old.yaml")
    assert space.latency == Workload(batch_size=1, new_tokens=8, objective="prefill_ms", repeats=5, warmup=1)
    served = parse_space({**data, "latency": {"batch_size": 4, "objective": "throughput"}}, "serve.yaml")
    assert served.latency.shape() == {"batch_size": 4, "new_tokens": 8, "objective": "throughput"}
    assert served.with_workload(objective="e2e_ms", batch_size=None).latency.objective == "e2e_ms"
    with pytest.raises(SpaceError, match="^serve.yaml: latency.batch_size"):
        served.with_workload(batch_size=0)


def test_workload_differences_name_each_part() -> None:
    tuned = {"batch_size": 8, "new_tokens": 16, "objective": "throughput"}
    assert differences(tuned, Workload(batch_size=8, new_tokens=16, objective="throughput")) == []
    assert differences(tuned, Workload()) == ["batch_size 1 (tuned for 8)", "new_tokens 8 (tuned for 16)",
                                              "objective prefill_ms (tuned for throughput)"]
    assert differences(None, Workload()) == []


def test_preset_workload_warning_names_each_difference_in_one_line() -> None:
    provenance = {"study": "serve", "trial": 7, "workload": {"batch_size": 8, "new_tokens": 16,
                                                             "objective": "throughput"}}
    message = workload_warning(provenance, Workload(new_tokens=16), ("batch_size", "new_tokens"))
    assert message is not None and "\n" not in message
    assert "study 'serve' trial 7" in message and "batch_size 1 (tuned for 8)" in message
    assert "new_tokens" not in message and "objective" not in message  # only the keys asked about
    assert workload_warning(provenance, Workload(batch_size=8, new_tokens=16, objective="throughput")) is None
    assert workload_warning({"study": "old"}, Workload()) is None  # a preset from before workloads says nothing


def test_pareto_front_follows_the_direction() -> None:
    """A throughput front keeps the highest tokens/s: minimising would keep the slowest point instead."""
    def trial(number: int, accuracy: float, value: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(values=[accuracy, value], state=TrialState.COMPLETE)

    fast, slow = trial(0, 0.9, 200.0), trial(1, 0.9, 100.0)
    fast.number, slow.number = 0, 1
    assert [t.number for t in pareto_front([fast, slow], OBJECTIVES["throughput"])] == [0]
    assert [t.number for t in pareto_front([fast, slow])] == [1]  # the default: lower is better


def _space(model: Path, **latency: object):
    data = {"study": "serve", "model": str(model), "tasks": [TASK], "subset": {"size": 4, "seed": 0},
            "methods": ["random"], "layer": [1], "keep_ratio": [0.25], "attn_implementation": "sdpa",
            "dtype": "float32", "device": "cpu", "batch_size": 4, "sampler": {"name": "random", "seed": 0},
            "trials": 2, "latency": {"new_tokens": 3, "repeats": 3, "warmup": 0, **latency}}
    return parse_space(data, "serve.yaml")


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks([TASK], subset_size=4, seed=0)


@pytest.mark.slow
def test_throughput_study_stores_the_workload_and_maximises(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Catches a throughput study minimised, a value that is not B * T per second of the batch's generate, a
    workload not stored, memory without its source, and a resumed study silently switching objective."""
    loaded, tasks = model_and_tasks
    storage = f"sqlite:///{tmp_path / 's.db'}"
    tuner = Tuner(_space(saved_dirs["llava"], batch_size=3, objective="throughput"), storage, loaded=loaded,
                  tasks=tasks, heartbeat_interval=1)
    assert tuner.measurer.batch_inputs["input_ids"].shape[0] == 3  # three documents of the task, one batch
    assert tuner.measurer.batch_inputs["attention_mask"][:, -1].all()  # left-padded as in evaluation
    study = tuner.run(2)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert study_objective(study).name == "throughput"
    assert study.user_attrs["workload"] == {"batch_size": 3, "new_tokens": 3, "objective": "throughput"}
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    for trial in trials:
        record = TrialRecord.from_trial(trial)
        assert trial.values[1] == record.throughput > 0
        assert record.workload_batch_size == 3 and record.workload_new_tokens == 3 and record.objective == "throughput"
        assert record.throughput_low <= record.throughput <= record.throughput_high
        assert record.ttft_ms <= record.e2e_ms and record.decode_batch_ms_per_token > 0
        assert record.memory_source == "analytic_kv_cache" and record.memory_bytes > 0
        assert record.baseline_objective_same_run > 0
        assert {key for key in RECORD_FIELDS if getattr(record, key) is None} == set()  # every field stored
        # where the trial's seconds went (bench-search's columns): the latency rounds are a timed part of it
        assert 0 < record.latency_seconds < trial.duration.total_seconds()
        measured = measured_of(trial)
        assert measured.latency_seconds == record.latency_seconds and measured.latency_rounds == record.prefill_repeats
    base = next(TrialRecord.from_trial(t) for t in trials if is_baseline(t))
    pruned = next(TrialRecord.from_trial(t) for t in trials if not is_baseline(t))
    assert pruned.memory_bytes < base.memory_bytes  # pruning 75% of the vision tokens shrinks the batch's KV cache
    assert base.speedup_same_run == 1.0  # the baseline's gain over itself, in its own rounds
    assert pareto_trials(study)
    sheet = pareto_sheet(study)
    assert "throughput tokens/s" in " ".join(c.header for c in sheet.columns) and "batch 3" in sheet.title
    pruned_trial = next(t for t in trials if not is_baseline(t))
    frame = pytest.importorskip("tuner.dashboard.frame").trial_frame(study)
    done = frame[frame["state"] == "complete"].set_index("number")
    assert done.loc[pruned_trial.number, "objective"] == pruned.throughput  # the dashboard's x: the objective
    assert done.loc[pruned_trial.number, "prefill_ms"] == pruned.prefill_ms  # prefill stays prefill
    assert set(done.index[done["pareto"]]) == {t.number for t in pareto_trials(study)}
    figures = pytest.importorskip("tuner.dashboard.figures")
    reference = figures.reference_point(study)  # below every throughput: Optuna's hypervolume needs it dominated
    assert reference[1] < min(t.values[1] for t in trials)
    assert "tokens/s" in figures.hypervolume_figure(study).layout.title.text
    assert "throughput" in done.loc[pruned_trial.number, "hover"] and "batch 3" in done.loc[pruned_trial.number,
                                                                                              "hover"]
    confirmation = confirm(tuner.measurer, study, tuner.space, repeats=2, warmup=0, trials=[pruned_trial])
    assert confirmation["objective"] == "throughput" and confirmation["batch_size"] == 3
    numbers = confirmation["trials"][str(pruned_trial.number)]
    assert numbers["objective"] == "throughput" and numbers["throughput"] > 0
    assert " tokens/s " in confirmed_text(study, pruned_trial)  # the confirmed numbers are of the objective
    json_row = sheet.as_json()["rows"][0]
    assert json_row["objective"] == "throughput" and json_row["objective_unit"] == "tokens/s"
    preset = preset_from_trial(study, pruned_trial)
    assert preset.provenance["workload"] == {"batch_size": 3, "new_tokens": 3, "objective": "throughput"}
    assert preset.metrics["objective"] == "throughput" and preset.metrics["throughput"] == pruned.throughput
    with pytest.warns(PresetMismatchWarning, match=r"batch_size 1 \(tuned for 3\)"):
        apply_pruning(loaded.model, preset, workload=Workload(new_tokens=3, objective="throughput")).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PresetMismatchWarning)  # the workload it was tuned for: no warning
        apply_pruning(loaded.model, preset, workload=Workload(batch_size=3, new_tokens=3,
                                                              objective="throughput")).remove()
    with pytest.raises(WorkloadMismatch, match="tuned for throughput at batch 3; this run asks for e2e_ms"):
        Tuner(_space(saved_dirs["llava"], batch_size=3, objective="e2e_ms"), storage, loaded=loaded, tasks=tasks)
    with pytest.raises(WorkloadMismatch, match="at batch 2"):
        Tuner(_space(saved_dirs["llava"], batch_size=2, objective="throughput"), storage, loaded=loaded, tasks=tasks)


@pytest.mark.slow
def test_default_study_keeps_prefill_and_its_directions(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Catches the default moving off prefill_ms: the second value is the single-request prefill, minimised."""
    loaded, tasks = model_and_tasks
    study = Tuner(_space(saved_dirs["llava"]), f"sqlite:///{tmp_path / 'd.db'}", loaded=loaded,
                  tasks=tasks, heartbeat_interval=1).run(1)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    record = TrialRecord.from_trial(trial)
    assert trial.values[1] == record.prefill_ms and record.ttft_ms is not None
    assert record.workload_batch_size == 1 and record.objective == "prefill_ms"


@pytest.mark.slow
def test_serving_bench_times_every_objective_at_each_batch(model_and_tasks) -> None:
    """Catches a throughput that is not B * T tokens over the batch's time, a batch that is not B documents, and a
    batch-1 run whose TTFT is not the single request's prefill."""
    loaded, tasks = model_and_tasks
    configs = {"random 0.25": PruningConfig(method="random", layer=1, keep_ratio=0.25)}
    runs = serving_runs(loaded, tasks[0], configs, [1, 2], new_tokens=3, repeats=1, warmup=0)
    assert [run.batch_size for run in runs] == [1, 2]
    for run in runs:
        assert list(run.results) == ["unpruned", "random 0.25"]
        for result in run.results.values():
            assert result.batch_size == run.batch_size
            objectives = result.objectives()
            assert objectives["throughput"] == pytest.approx(run.batch_size * 3 * 1000 / objectives["e2e_ms"])
            if run.batch_size == 1:
                assert objectives["ttft_ms"] == objectives["prefill_ms"]  # one request: the same run
        assert run.results["random 0.25"].memory()[0] < run.results["unpruned"].memory()[0]
    two = runs[1].results["unpruned"]
    assert two.batch_cost.kv_cache_bytes > runs[0].results["unpruned"].batch_cost.kv_cache_bytes  # 2 rows of KV
    sheet = serving_sheet(runs, "serving")
    assert len(sheet.rows) == 4 and sheet.rows[0][2].count("x") == 0 and sheet.rows[1][2].endswith("x")


def test_bench_serving_bad_input_is_one_line_before_loading() -> None:
    result = CliRunner().invoke(app, ["bench-serving", "--keep-ratio", "1.5", "--model", "no/such-model"])
    assert result.exit_code == 2 and "keep_ratio" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_bench_serving_prints_every_objective_per_batch_as_json() -> None:
    result = CliRunner().invoke(app, ["bench-serving", "--method", "random", "--batch", "2", "--repeats", "1",
                                      "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["batch_size"], r["config"]) for r in rows] == [(2, "unpruned"), (2, "random 0.1")]
    assert all(r["throughput"] == pytest.approx(2 * 2 * 1000 / r["e2e_ms"]) for r in rows)


@pytest.mark.parametrize(("flags", "culprit"), [(["--objective", "ttft"], "'ttft'"),
                                                (["--latency-batch", "0"], "latency.batch_size"),
                                                (["--new-tokens", "1"], "latency.new_tokens")])
def test_tune_workload_options_fail_in_one_line_naming_the_value(tmp_path: Path, flags: list[str],
                                                                 culprit: str) -> None:
    """Refused before the model loads: the space names no real model."""
    space = tmp_path / "serve.yaml"
    space.write_text("model: no/such-model\ntasks: [dart_shapes]\nmethods: [random]\nlayer: 1\nkeep_ratio: 0.5\n")
    result = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage",
                                      f"sqlite:///{tmp_path / 's.db'}", *flags])
    assert result.exit_code == 2 and culprit in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_bench_search_refuses_a_throughput_space_before_measuring(tmp_path: Path) -> None:
    """Its hypervolume is of a latency down: a maximised objective would be measured for nothing, then misread."""
    space = tmp_path / "grid.yaml"
    space.write_text("model: no/such-model\ntasks: [dart_shapes]\nmethods: [random]\nlayer: [1]\n"
                     "keep_ratio: [0.5]\nsampler: {name: grid}\nlatency: {objective: throughput}\n")
    result = CliRunner().invoke(app, ["bench-search", "--space", str(space), "--storage",
                                      f"sqlite:///{tmp_path / 'g.db'}", "--samplers", "random", "--seeds", "1"])
    assert result.exit_code != 0 and "latency.objective throughput is maximised" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_batch_larger_than_the_subset_names_the_setting(model_and_tasks) -> None:
    loaded, tasks = model_and_tasks
    with pytest.raises(ValueError, match="^latency.batch_size 9: task dart_shapes has 4 documents"):
        TrialMeasurer(loaded, tasks, Workload(batch_size=9))
