"""The tuning service on a tiny LLaVA: what a study stores, constraints, failures, resuming, provenance, a worker
killed mid-trial, and several workers on one study (SQLite, and PostgreSQL where CI provides one)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from typer.testing import CliRunner

from tuner.cli import app
from tuner.evaluation.tasks import load_tasks
from tuner.models.loading import load_model
from tuner.results import config_of, is_baseline, pareto_trials
from tuner.results.export import NoTrialQualifies, Rule, choose_trial, preset_from_trial
from tuner.results.storage import HEARTBEAT_FAILURE, open_for_tuning
from tuner.results.tables import NOISY_FOOTNOTE
from tuner.search.confirm import confirm, front_to_confirm
from tuner.search.space import parse_space
from tuner.search.study import ProvenanceMismatch, Tuner

TASK = "dart_shapes"
DART_TUNER = str(Path(sys.executable).parent / "dart-tuner")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space_data(model: Path, **changes: object) -> dict:
    data = {"study": "tiny", "model": str(model), "tasks": [TASK], "subset": {"size": 6, "seed": 0},
            "methods": ["dart", "random"], "layer": [1, 2], "keep_ratio": [0.25, 0.5],
            "options": {"dart": {"n_image_pivots": [4], "n_text_pivots": [4]}},
            "attn_implementation": "sdpa", "dtype": "float32",
            "device": "cpu", "batch_size": 3, "max_failures": 100, "sampler": {"name": "random", "seed": 0},
            "trials": 3, "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    return {**data, **changes}


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    """Load the tiny LLaVA and the task subset once for every in-process study of this module."""
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks([TASK], subset_size=6, seed=0)


def _tuner(saved_dirs: dict[str, Path], model_and_tasks: tuple, storage: str, **changes: object) -> Tuner:
    loaded, tasks = model_and_tasks
    space = parse_space(_space_data(saved_dirs["llava"], **changes), "tiny.yaml")
    return Tuner(space, storage, loaded=loaded, tasks=tasks, heartbeat_interval=1)


def test_study_stores_baseline_first_and_every_number(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Catches a baseline that is not trial 0, objectives that differ from the stored attributes, and a
    provenance that is not stored."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _tuner(saved_dirs, model_and_tasks, storage).run(3)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    assert is_baseline(trials[0]) and trials[0].number == 0 and trials[0].params == {}
    assert trials[1].user_attrs["role"] == "paper_default"
    paper = {"method": "dart", "layer": 2, "dart.n_image_pivots": 4, "dart.n_text_pivots": 4}
    assert {k: trials[1].params[k] for k in paper} == paper
    assert config_of(trials[1]).options["n_image_pivots"] == 4 and trials[1].user_attrs["config_schema"] == 2
    for trial in trials:
        assert trial.values == [trial.user_attrs["accuracy"], trial.user_attrs["prefill_ms"]]
        assert len(trial.user_attrs["samples"]) == 6
        assert trial.user_attrs["prefill_flops"] > 0 and trial.user_attrs["kv_cache_bytes"] > 0
    base, pruned = trials[0].user_attrs, trials[1].user_attrs
    assert base["speedup_same_run"] == base["speedup_low"] == base["speedup_high"] == 1.0  # timed against itself
    for attrs in (base, pruned):  # the space times 1 round: too few to bound a speed-up
        assert attrs["speedup_low"] <= attrs["speedup_same_run"] <= attrs["speedup_high"]
        assert attrs["latency_noisy"] is True and attrs["latency_warning"].startswith("only 1 timed round")
    for attrs in (base, pruned):  # the uncertainty stored with every trial (tuner.results.evidence)
        assert attrs["accuracy_low"] <= attrs["accuracy"] <= attrs["accuracy_high"]
        assert attrs["accuracy_interval"] == "wilson" and attrs["sample_tasks"] == [[TASK, 6]]
        assert attrs["prefill_ms_low"] <= attrs["prefill_ms"] <= attrs["prefill_ms_high"]
    assert "accuracy_diff" not in base and pruned["n_paired"] == 6  # paired with the baseline's stored scores
    wrong_right = sum(1 for (_, b, _), (_, p, _) in zip(base["samples"], pruned["samples"]) if p > b)
    assert pruned["discordant_improved"] == wrong_right
    assert pruned["accuracy_diff"] == pytest.approx(pruned["accuracy"] - base["accuracy"])
    assert 0 < pruned["mcnemar_p"] <= 1
    assert pruned["kept_vision_mean"] < base["kept_vision_mean"]
    assert pruned["flops_ratio"] < 1.0 == base["flops_ratio"]
    assert pruned["config"]["keep_ratio"] == 0.25 and base["config"] is None
    reloaded = optuna.load_study(study_name="tiny", storage=storage)
    provenance = reloaded.user_attrs["provenance"]
    assert provenance["family"] == "llava" and provenance["tasks"][0]["name"] == TASK
    assert provenance["tasks"][0]["size"] == 6 and provenance["versions"]["torch"]
    assert reloaded.user_attrs["baseline"]["trial"] == 0


def test_the_baseline_trial_evaluates_the_baseline_once(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Its relative-accuracy constraint uses the accuracy it just measured, not a second evaluation."""
    tuner = _tuner(saved_dirs, model_and_tasks, f"sqlite:///{tmp_path / 's.db'}",
                   constraints={"min_relative_accuracy": 0.5})
    calls = []
    evaluate = tuner.measurer.evaluator.evaluate
    tuner.measurer.evaluator.evaluate = lambda config, **kwargs: calls.append(config) or evaluate(config, **kwargs)
    study = tuner.run(1)
    assert calls == [None]
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert trial.constraints == {"min_relative_accuracy": pytest.approx(-0.5 * trial.user_attrs["accuracy"])}


def test_infeasible_trials_stay_out_of_the_pareto_set(saved_dirs, model_and_tasks, tmp_path) -> None:
    """A latency ceiling no trial meets: every trial is stored, none is offered as a Pareto point."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _tuner(saved_dirs, model_and_tasks, storage, constraints={"max_prefill_ms": 1e-6}).run(2)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert pareto_trials(study) == []
    relaxed = _tuner(saved_dirs, model_and_tasks, f"sqlite:///{tmp_path / 'r.db'}").run(2)
    assert pareto_trials(relaxed)


def test_a_hopeless_trial_stops_after_its_first_chunk(saved_dirs, model_and_tasks, tmp_path) -> None:
    """An accuracy floor no score can reach (1.5) with chunks of 2 documents: the pruned trial stops after its first
    chunk, stored complete but infeasible with its 2 scores, its bound as accuracy and the reason; the baseline runs
    its whole subset; export never offers the stopped trial."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _tuner(saved_dirs, model_and_tasks, storage, constraints={"min_accuracy": 1.5},
                   early_stopping={"chunk_size": 2}).run(2)
    base, stopped = study.get_trials(states=(TrialState.COMPLETE,))
    assert "stopped_early" not in base.user_attrs and base.user_attrs["n_samples"] == 6
    attrs = stopped.user_attrs
    assert attrs["stopped_early"] is True and attrs["n_samples"] == len(attrs["samples"]) == 2
    assert attrs["stop_reason"].startswith("stopped after 2 of 6 documents")
    right = sum(score for _, score, _ in attrs["samples"])
    assert stopped.values[0] == attrs["accuracy_upper_bound"] == pytest.approx((right + 4) / 6)
    assert attrs["accuracy_partial"] == pytest.approx(right / 2)
    assert stopped.constraints["min_accuracy"] == pytest.approx(1.5 - stopped.values[0]) and stopped.values[0] < 1.5
    assert pareto_trials(study) == []
    with pytest.raises(NoTrialQualifies, match="stopped early"):
        choose_trial(study, Rule(trial=stopped.number))
    with pytest.raises(NoTrialQualifies, match="no complete pruned trial"):
        choose_trial(study, Rule(min_accuracy=0.0))


def test_confirmation_stores_its_numbers_and_leaves_the_search_ones(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Catches a confirmation that overwrites a trial's search-time numbers, times the front apart from the
    baseline, or scores accuracy on questions the search already saw."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    tuner_ = _tuner(saved_dirs, model_and_tasks, storage)
    study = tuner_.run(3)
    before = {t.number: (t.values, dict(t.user_attrs)) for t in study.get_trials()}
    pruned = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not is_baseline(t)]
    front = [t.number for t in pruned]  # the whole front may be the baseline on 6 questions and 1 round: all of them
    assert {t.number for t in front_to_confirm(study)} <= set(front)
    record = confirm(tuner_.measurer, tuner_.study, tuner_.space, repeats=3, fresh_size=4, fresh_seed=1,
                     trials=pruned)
    reloaded = optuna.load_study(study_name="tiny", storage=storage)
    assert reloaded.user_attrs["confirmation"] == record
    assert {t.number: (t.values, dict(t.user_attrs)) for t in reloaded.get_trials()} == before
    assert sorted(record["trials"]) == sorted(str(n) for n in front) and record["repeats"] == 3
    for numbers in record["trials"].values():
        assert numbers["speedup_low"] <= numbers["speedup"] <= numbers["speedup_high"]
        assert numbers["prefill_ms_low"] <= numbers["prefill_ms"] <= numbers["prefill_ms_high"]
        assert numbers["n_samples"] == 4 and numbers["n_paired"] == 4 and 0 <= numbers["accuracy"] <= 1
    assert record["baseline"]["n_samples"] == 4
    loaded, tasks = model_and_tasks
    fresh = load_tasks([TASK], subset_size=4, seed=1, exclude={TASK: tasks[0].doc_indices})
    assert not set(fresh[0].doc_indices) & set(tasks[0].doc_indices)
    assert record["fresh_subset"][0]["hash"] == fresh[0].subset.hash != tasks[0].subset.hash
    trial = next(t for t in reloaded.get_trials() if t.number == front[0])
    assert preset_from_trial(reloaded, trial).metrics["confirmed"] == record["trials"][str(front[0])]


def test_a_failing_trial_is_stored_with_its_reason(saved_dirs, model_and_tasks, tmp_path, monkeypatch) -> None:
    """A trial that raises (an out-of-memory, say) is kept as failed with the reason, and the study goes on."""
    tuner = _tuner(saved_dirs, model_and_tasks, f"sqlite:///{tmp_path / 's.db'}")
    real = tuner.measurer.evaluator.evaluate

    def fail_for_dart(config, on_progress=None):
        if config is not None and config.method == "dart":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(config, on_progress=on_progress)

    monkeypatch.setattr(tuner.measurer.evaluator, "evaluate", fail_for_dart)
    study = tuner.run(2)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and failed[0].number == 1  # the paper default is a DART trial
    assert failed[0].user_attrs["failure"] == "RuntimeError: CUDA out of memory (simulated)"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_resume_continues_numbering_and_keeps_one_baseline(saved_dirs, model_and_tasks, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _tuner(saved_dirs, model_and_tasks, storage).run(2)
    study = _tuner(saved_dirs, model_and_tasks, storage).run(4)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in study.trials] == list(range(len(study.trials)))
    assert len(complete) == 4
    assert sum(is_baseline(t) for t in study.trials) == 1


def test_another_setup_is_refused_unless_mixing_is_asked_for(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Trials measured on another task subset are not comparable; the error lists what differs."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _tuner(saved_dirs, model_and_tasks, storage).run(1)
    loaded, _ = model_and_tasks
    other_tasks = load_tasks([TASK], subset_size=6, seed=1)
    space = parse_space(_space_data(saved_dirs["llava"], subset={"size": 6, "seed": 1}), "tiny.yaml")
    with pytest.raises(ProvenanceMismatch, match="tasks: study has"):
        Tuner(space, storage, loaded=loaded, tasks=other_tasks)
    Tuner(space, storage, loaded=loaded, tasks=other_tasks, allow_mixed=True)


def test_a_duplicate_baseline_from_a_racing_worker_is_pruned(saved_dirs, model_and_tasks, tmp_path) -> None:
    """Two workers creating the study at once may both enqueue the baseline; only one may be measured."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    tuner = _tuner(saved_dirs, model_and_tasks, storage)
    tuner.study.add_trial(optuna.create_trial(state=TrialState.WAITING, user_attrs={"role": "baseline"},
                                              system_attrs={"fixed_params": {}}))
    study = tuner.run(3)
    baselines = [t for t in study.trials if is_baseline(t)]
    assert [t.state for t in baselines] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert baselines[1].user_attrs["duplicate_of"] == baselines[0].number


def _write_space(tmp_path: Path, model: Path, **changes: object) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_space_data(model, **changes)))
    return path


def _worker(space: Path, storage: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([DART_TUNER, "tune", "--space", str(space), "--storage", storage, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _has_heartbeat(storage: str, trial_id: int) -> bool:
    """Whether the worker's heartbeat thread has recorded the trial yet: a trial killed before its first heartbeat
    is never found stale (Optuna only fails trials whose heartbeats stopped)."""
    with sqlite3.connect(storage.removeprefix("sqlite:///")) as connection:
        return connection.execute("SELECT 1 FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)).fetchone() \
            is not None


def _running_trial(storage: str, study: str, deadline: float, worker: subprocess.Popen | None = None) -> int:
    while time.monotonic() < deadline and (worker is None or worker.poll() is None):
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            trials = []
        if trials and (worker is None or _has_heartbeat(storage, trials[0]._trial_id)):
            return trials[0].number
        time.sleep(0.2)
    ended = "" if worker is None or worker.poll() is None else f" (the worker exited {worker.returncode})"
    raise AssertionError(f"no trial started within the deadline{ended}")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_worker_s_trial_is_failed_and_retried(saved_dirs, model_and_tasks, tmp_path) -> None:
    """SIGKILL mid-trial: the heartbeat marks the trial failed, with that reason, and it is measured again by the
    next worker, keeping its role (a killed baseline is retried as the baseline)."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    worker = _worker(_write_space(tmp_path, saved_dirs["llava"]), storage, "--heartbeat-interval", "1")
    try:  # a cold start imports torch, transformers and lmms-eval: on a busy 2-core runner that can take minutes
        killed = _running_trial(storage, "tiny", time.monotonic() + 300, worker)
    except AssertionError as error:  # say what the worker printed, so a failure here can be told apart
        worker.kill()
        raise AssertionError(f"{error}; the worker printed: {worker.communicate()[0][-2000:]}") from None
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    study = _tuner(saved_dirs, model_and_tasks, storage).run(3)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed].state == TrialState.FAIL
    assert by_number[killed].user_attrs["failure"] == HEARTBEAT_FAILURE  # the stored study says what happened
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert "failure" not in retries[0].user_attrs  # the retry does not inherit the reason
    assert retries[0].user_attrs.get("role") == by_number[killed].user_attrs.get("role")
    assert sum(is_baseline(t) and t.state == TrialState.COMPLETE for t in study.trials) == 1


def test_a_worker_whose_trial_was_taken_over_goes_on(saved_dirs, model_and_tasks, tmp_path, monkeypatch) -> None:
    """While the database is away for longer than the grace period, another worker may find this worker's
    heartbeats stale, fail its trial and queue a retry. This worker then cannot record its result: it must drop
    it and go on, not crash, and the retry measures the configuration."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    tuner = _tuner(saved_dirs, model_and_tasks, storage)
    real, taken = tuner.measure, []

    def measure_while_taken_over(config):  # noqa: ANN001
        outcome = real(config)
        if config is not None and not taken:  # the other worker's stale-trial check finds this trial stale
            other = optuna.load_study(study_name="tiny", storage=open_for_tuning(storage, heartbeat_interval=1))
            stale_id = tuner._running._trial_id
            with monkeypatch.context() as patch:
                patch.setattr(RDBStorage, "_get_stale_trial_ids", lambda self, study_id: [stale_id])
                optuna.storages.fail_stale_trials(other)  # fails it with the reason and queues the retry
            taken.append(tuner._running.number)
        return outcome

    monkeypatch.setattr(tuner, "measure", measure_while_taken_over)
    study = tuner.run(3)
    by_number = {t.number: t for t in study.trials}
    assert by_number[taken[0]].state == TrialState.FAIL
    assert by_number[taken[0]].user_attrs["failure"] == HEARTBEAT_FAILURE
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == taken[0]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_a_worker_whose_trial_another_worker_completed_goes_on(saved_dirs, model_and_tasks, tmp_path,
                                                               monkeypatch) -> None:
    """Under load SQLite can let two workers take the same waiting trial; the one that records second must drop
    its measurement and go on, not crash, and the study keeps the first result."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    tuner = _tuner(saved_dirs, model_and_tasks, storage)
    real, taken = tuner.measure, []

    def measure_while_another_worker_completes(config):  # noqa: ANN001
        outcome = real(config)
        if config is not None and not taken:  # the other worker records the same trial first
            other = optuna.load_study(study_name="tiny", storage=storage)
            trial_id = tuner._running._trial_id
            other._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5, 1.0])
            taken.append(tuner._running.number)
        return outcome

    monkeypatch.setattr(tuner, "measure", measure_while_another_worker_completes)
    study = tuner.run(3)
    by_number = {t.number: t for t in study.trials}
    assert by_number[taken[0]].state == TrialState.COMPLETE and by_number[taken[0]].values == [0.5, 1.0]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def _two_workers(space: Path, storage: str, study: str, trials: int) -> optuna.Study:
    workers = [_worker(space, storage, "--study", study, "--trials", str(trials)) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    return optuna.load_study(study_name=study, storage=storage)


def _check_shared_study(study: optuna.Study, trials: int) -> None:
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert trials <= len(complete) <= trials + 1  # each worker checks the target after its own trial
    assert sum(is_baseline(t) for t in complete) == 1
    assert not study.get_trials(states=(TrialState.FAIL,))
    assert all("accuracy" in t.user_attrs and "prefill_ms" in t.user_attrs for t in complete)


def test_two_workers_share_a_sqlite_study(saved_dirs, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    _check_shared_study(_two_workers(_write_space(tmp_path, saved_dirs["llava"]), storage, "shared", 5), 5)


def test_two_workers_share_a_postgresql_study(saved_dirs, tmp_path) -> None:
    url = os.environ.get("DART_TUNER_TEST_POSTGRES")
    if not url:
        if os.environ.get("DART_TUNER_REQUIRE_POSTGRES") == "1":
            pytest.fail("DART_TUNER_REQUIRE_POSTGRES=1 but DART_TUNER_TEST_POSTGRES is not set")
        pytest.skip("set DART_TUNER_TEST_POSTGRES=postgresql+psycopg://... to run (.ci/run starts one)")
    study = f"pg-{uuid.uuid4().hex[:8]}"
    _check_shared_study(_two_workers(_write_space(tmp_path, saved_dirs["llava"]), url, study, 5), 5)


def test_cli_tune_prints_the_pareto_front_and_studies_lists_it(saved_dirs, tmp_path) -> None:
    runner = CliRunner()
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    space = _write_space(tmp_path, saved_dirs["llava"])
    result = runner.invoke(app, ["tune", "--space", str(space), "--storage", storage, "--trials", "2"])
    assert result.exit_code == 0, result.output
    assert "trial 0" in result.output and "trial 1: dart K=2" in result.output
    assert "Pareto" in result.output
    words = " ".join(result.output.split())  # rich wraps at the runner's 80 columns
    assert "x*), noisy latency: only 1 timed round" in words  # the per-trial line (the space times 1 round)
    assert " ".join(NOISY_FOOTNOTE.split()) in words  # the front's footnote
    listed = runner.invoke(app, ["studies", "--storage", storage])
    assert listed.exit_code == 0 and "tiny" in listed.output


@pytest.mark.parametrize(("args", "words"), [
    (["--space", "missing.yaml"], "cannot read search space"),
    (["--sampler", "cmaes"], "--sampler must be one of"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--task", "dart_shapez"], "dart_shapes"),  # the suggestion
])
def test_cli_tune_errors_name_the_culprit(saved_dirs, tmp_path, args: list[str], words: str) -> None:
    space = _write_space(tmp_path, saved_dirs["llava"], layer=[1, 2])
    base = ["tune", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'e.db'}"]
    if args[0] == "--space":
        base = base[:1] + [args[0], str(tmp_path / args[1])] + base[3:]
    else:
        base += args
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2, result.output
    assert words in result.output


def test_cli_tune_refuses_a_layer_beyond_the_model(saved_dirs, tmp_path) -> None:
    space = _write_space(tmp_path, saved_dirs["llava"], layer=[1, 9])
    result = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'e.db'}"])
    assert result.exit_code == 2 and "layer" in result.output and "4 decoder layers" in result.output


@pytest.mark.parametrize(("changes", "key"), [
    ({"budget": {"low": 8, "high": 5000}, "keep_ratio": None}, "budget"),
    ({"options": {"dart": {"n_image_pivots": [4, 5000]}}}, "options.dart.n_image_pivots"),
])
def test_cli_tune_refuses_more_tokens_than_the_prompt_has(saved_dirs, tmp_path, changes, key) -> None:
    """A budget or an image-pivot count above the vision tokens the latency is measured on: one line naming the
    file, the key and both numbers, and no trial stored."""
    data = {k: v for k, v in _space_data(saved_dirs["llava"], **changes).items() if v is not None}
    space = tmp_path / "tokens.yaml"
    space.write_text(yaml.safe_dump(data))
    db = tmp_path / "e.db"
    result = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"tokens.yaml: {key}: the space allows up to 5000, more than the" in message
    assert "vision tokens of the latency prompt (dart_shapes, first document)" in message
    assert not optuna.get_all_study_summaries(f"sqlite:///{db}")


def test_studies_on_a_bad_storage_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["studies", "--storage", "notadb://x"])
    assert result.exit_code == 2 and "storage 'notadb://x': unknown database scheme" in result.output


def test_storage_retries_at_most_twice(tmp_path) -> None:
    storage = open_for_tuning(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    assert storage.heartbeat_interval == 1 and storage.heartbeat_stale_trial_callback._max_retry == 2


def test_workers_draw_different_configurations_and_a_seed_reproduces_them() -> None:
    """Two workers starting on one study with the space's seed used to sample identical configurations; the
    per-trial seed stream gives each trial number its own draw, and the same seed gives the same sequence."""
    from tuner.search.samplers import make_sampler

    space = parse_space(_space_data(Path("unused"), keep_ratio={"low": 0.05, "high": 0.9},
                                    sampler={"name": "tpe", "seed": 3}), "tiny.yaml")

    def draws(storage: optuna.storages.BaseStorage, workers: int, n: int) -> list[dict]:
        studies = [optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"],
                                       sampler=make_sampler(space), load_if_exists=True) for _ in range(workers)]
        trials = [studies[i % workers].ask() for i in range(n)]  # all asked before any is told: no history
        return [space.suggest(trial).__dict__ for trial in trials]

    two_workers = draws(optuna.storages.InMemoryStorage(), 2, 6)
    assert len({str(d) for d in two_workers}) == 6
    assert draws(optuna.storages.InMemoryStorage(), 1, 6) == two_workers  # worker count does not change draws


def test_a_complete_configuration_is_not_measured_again(saved_dirs, model_and_tasks, tmp_path) -> None:
    """A space with one pruned configuration: after it is measured, further proposals are pruned as duplicates
    naming the trial that holds it, unless repeats are asked for."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    one_config = {"methods": ["random"], "layer": [2], "keep_ratio": [0.5], "options": None}
    study = _tuner(saved_dirs, model_and_tasks, storage, **one_config).run(3)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    skipped = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) == 2 and is_baseline(complete[0])
    assert skipped and {t.user_attrs["duplicate_of"] for t in skipped} == {complete[1].number}
    loaded, tasks = model_and_tasks
    space = parse_space(_space_data(saved_dirs["llava"], **one_config), "tiny.yaml")
    again = Tuner(space, storage, loaded=loaded, tasks=tasks, allow_repeats=True).run(3)
    assert len(again.get_trials(states=(TrialState.COMPLETE,))) == 3
