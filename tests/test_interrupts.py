"""Ctrl-C: a real SIGINT to a `dart-tuner tune` process mid-trial (a pruned trial, and the baseline) exits 130,
says which trial was queued again, and the same command then measures it; nothing is lost or measured twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tuner.evaluation.tasks import load_tasks
from tuner.models.loading import load_model
from tuner.results import is_baseline
from tuner.search.space import parse_space
from tuner.search.study import INTERRUPTED, REQUEUED_FROM_ATTR, Tuner

DART_TUNER = str(Path(sys.executable).parent / "dart-tuner")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space_data(model: Path) -> dict:
    # Twelve single-request batches and 10 latency rounds: a trial lasts long enough to be interrupted in.
    return {"study": "ctrlc", "model": str(model), "tasks": ["dart_shapes"], "subset": {"size": 12, "seed": 0},
            "methods": ["random", "pooling"], "layer": [1, 2], "keep_ratio": {"low": 0.2, "high": 0.6},
            "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu", "batch_size": 1,
            "sampler": {"name": "random", "seed": 0}, "latency": {"new_tokens": 2, "repeats": 10, "warmup": 0}}


def _tune(space: Path, storage: str, *extra: str) -> subprocess.Popen:
    """A worker that takes SIGINT as a terminal's Ctrl-C would (a background shell may have it ignored)."""
    return subprocess.Popen([DART_TUNER, "tune", "--space", str(space), "--storage", storage, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_when_running(worker: subprocess.Popen, storage: str, *, baseline: bool) -> str:
    """SIGINT as soon as the baseline (or a pruned trial, once it has drawn its parameters) runs; the worker's
    output."""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                running = optuna.load_study(study_name="ctrlc", storage=storage).get_trials(
                    states=(TrialState.RUNNING,))
            except KeyError:  # the worker has not created the study yet
                running = []
            if running and is_baseline(running[0]) == baseline and (baseline or running[0].params):
                worker.send_signal(signal.SIGINT)
                return worker.communicate(timeout=120)[0]
            time.sleep(0.05)
        raise AssertionError("no such trial started within the deadline")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.parametrize("baseline", [False, True], ids=["pruned trial", "baseline"])
def test_ctrl_c_mid_trial_queues_it_again_and_the_next_run_measures_it(saved_dirs, tmp_path, baseline) -> None:
    space = tmp_path / "ctrlc.yaml"
    space.write_text(yaml.safe_dump(_space_data(saved_dirs["llava"])))
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    worker = _tune(space, storage, "--trials", "3")
    output = _interrupt_when_running(worker, storage, baseline=baseline)
    assert worker.returncode == 130, output
    assert "Traceback" not in output and "UpdateFinishedTrialError" not in output, output

    trials = optuna.load_study(study_name="ctrlc", storage=storage).get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["failure"] == INTERRUPTED, output
    again = [t for t in trials if t.user_attrs.get(REQUEUED_FROM_ATTR) == interrupted[0].number]
    assert len(again) == 1 and again[0].state == TrialState.WAITING
    assert is_baseline(again[0]) == baseline == is_baseline(interrupted[0])
    assert f"trial {again[0].number} queued again in place of the interrupted one" in " ".join(output.split())

    resumed = _tune(space, storage, "--trials", "3")
    resumed_output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_output
    trials = {t.number: t for t in optuna.load_study(study_name="ctrlc", storage=storage).get_trials()}
    measured = trials[again[0].number]
    assert measured.state == TrialState.COMPLETE
    # the parameters drawn before the interrupt are kept (all of them, unless it came mid-draw)
    assert interrupted[0].params.items() <= measured.params.items() and (baseline or interrupted[0].params)
    assert sum(is_baseline(t) and t.state == TrialState.COMPLETE for t in trials.values()) == 1
    assert sum(t.state == TrialState.WAITING for t in trials.values()) == 0


def test_an_interrupt_between_trials_queues_nothing(saved_dirs, tmp_path) -> None:
    """Ctrl-C after a trial finished (in a callback, here): nothing was lost, so nothing is queued again."""
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    space = parse_space(_space_data(saved_dirs["llava"]), "ctrlc.yaml")
    tuner = Tuner(space, f"sqlite:///{tmp_path / 'c.db'}", loaded=loaded,
                  tasks=load_tasks(["dart_shapes"], subset_size=12, seed=0), heartbeat_interval=1)

    def interrupt(study, trial):  # noqa: ANN001
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tuner.run(2, callbacks=[interrupt])
    assert tuner.requeued is None
    assert [t.state for t in tuner.study.get_trials()] == [TrialState.COMPLETE]


def test_ctrl_c_while_loading_is_one_line_and_exit_130(saved_dirs, tmp_path) -> None:
    """Before any trial (libraries importing, the model loading): exit 130 with one line, no traceback, no trial."""
    space = tmp_path / "ctrlc.yaml"
    space.write_text(yaml.safe_dump(_space_data(saved_dirs["llava"])))
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    worker = _tune(space, storage, "--trials", "3")
    time.sleep(3)  # past the interpreter's own start-up, before the first trial
    worker.send_signal(signal.SIGINT)
    try:
        output = worker.communicate(timeout=5)[0]
    except subprocess.TimeoutExpired:
        # Python drops a Ctrl-C that lands in an object's finalizer during an import ("Exception ignored in ...
        # __del__"), so the user presses it again; that report is Python's own, not a traceback of ours.
        worker.send_signal(signal.SIGINT)
        output = worker.communicate(timeout=120)[0]
    ours = re.sub(r"Exception ignored in: <function [^\n]*__del__[^\n]*\nTraceback.*?KeyboardInterrupt: *\n", "",
                  output, flags=re.S)
    assert worker.returncode == 130 and "Traceback" not in ours, output
    assert "interrupted" in output
