"""A search space is compared with the stored study before anything is loaded: what Optuna would refuse to draw
(a changed list of values, a range turned into a list, log toggled) is named in one line; what it accepts (a
changed numeric range, a parameter added) resumes."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from tuner.cli import app
from tuner.results.storage import open_for_tuning
from tuner.search.space import SearchSpace, load_space, parse_space
from tuner.search.space_changes import (
    SpaceChanged,
    check_space_fits,
    free_study_name,
    space_changes,
    space_parameters,
    stored_distributions,
)
from tuner.search.study import Tuner

optuna.logging.set_verbosity(optuna.logging.WARNING)
BASE = {"model": "m", "tasks": ["dart_shapes"], "methods": ["random", "pooling", "dart"],
        "layer": {"low": 1, "high": 3}, "keep_ratio": {"low": 0.1, "high": 0.5},
        "options": {"dart": {"n_image_pivots": {"low": 1, "high": 8}, "pivot_order": ["rank", "position"]}}}


def _space(**changes: object) -> SearchSpace:
    data = {**BASE, **changes}
    return parse_space({k: v for k, v in data.items() if v is not None}, "s.yaml")


def _study_of(space: SearchSpace, n: int = 30, seed: int = 0) -> optuna.Study:
    """An in-memory study whose `n` trials `space` drew (random sampler: every method and option shows up)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, [0.5, 1.0])
    return study


SPACES = {
    "options": {},
    "budget and int lists": {"keep_ratio": None, "budget": [16, 32], "layer": [1, 2]},
    "log range": {"keep_ratio": {"low": 0.05, "high": 0.5, "log": True}},
    "schedule": {"methods": ["pdrop", "random"], "options": None,
                 "schedule": {"layers": [{"low": 1, "high": 2}, [3, 4]], "keep_ratio": {"low": 0.3, "high": 0.9}}},
    "shared schedule": {"methods": ["pdrop"], "layer": None, "keep_ratio": None, "options": None,
                        "schedule": {"layers": [1, 3], "keep_ratio": [0.5, 0.7], "shared": True}},
    "before_lm": {"layer": {"low": 1, "high": 2}, "before_lm": {
        "methods": ["none", "divprune", "cdpruner"], "keep_ratio": {"low": 0.25, "high": 1.0},
        "options": {"cdpruner": {"theta": {"low": 0.1, "high": 0.9}}}}},
    "grid": {"keep_ratio": [0.25, 0.5], "layer": [1, 2], "options": {"dart": {"n_image_pivots": [2, 4]}},
             "sampler": {"name": "grid"}},
}


@pytest.mark.parametrize("changes", SPACES.values(), ids=SPACES.keys())
def test_the_distributions_are_those_suggest_stores(changes: dict) -> None:
    """Every parameter a trial stores, with the very distribution Optuna stored, is one `space_parameters` lists:
    so the comparison judges the space by what its trials will draw."""
    space = _space(**changes)
    parameters = space_parameters(space)
    seen = set()
    for trial in _study_of(space).trials:
        for name, distribution in trial.distributions.items():
            assert parameters[name].distribution == distribution, name
            seen.add(name)
    assert seen == set(parameters)
    assert not space_changes(_study_of(space).trials, parameters)  # the same space fits its own study


@pytest.mark.parametrize(("changes", "line"), [
    ({"methods": ["random", "dart", "fastv"]},
     "methods: stored [random, pooling, dart], space has [random, dart, fastv]"),
    ({"methods": ["dart", "random", "pooling"]},
     "methods: stored [random, pooling, dart], space has [dart, random, pooling] (the same values in another "
     "order: list them in the stored order)"),
    ({"layer": [1, 2, 3]}, "layer: stored {low: 1, high: 3}, space has [1, 2, 3]"),
    ({"keep_ratio": {"low": 0.1, "high": 0.5, "log": True}},
     "keep_ratio: stored {low: 0.1, high: 0.5}, space has {low: 0.1, high: 0.5, log: true}"),
    ({"options": {"dart": {"n_image_pivots": {"low": 1, "high": 8}, "pivot_order": ["rank"]}}},
     "options.dart.pivot_order: stored [rank, position], space has [rank]"),
])
def test_what_optuna_refuses_is_named_by_its_space_key(changes: dict, line: str) -> None:
    study = _study_of(_space())
    changed = _space(**changes)
    assert space_changes(study.trials, space_parameters(changed)) == [line]
    study.enqueue_trial({"method": "dart"})  # a trial that draws every parameter above
    trial = study.ask()
    with pytest.raises(ValueError):  # Optuna itself refuses the same draw
        changed.suggest(trial)


@pytest.mark.parametrize("changes", [
    {"layer": {"low": 1, "high": 6}},  # widened
    {"keep_ratio": {"low": 0.2, "high": 0.3}},  # narrowed
    {"options": {"dart": {"n_image_pivots": {"low": 2, "high": 16}, "pivot_order": ["rank", "position"]}}},
    {"options": {"dart": {"pivot_order": ["rank", "position"], "n_text_pivots": [2, 4]}}},  # one added, one dropped
    {"subset": {"size": 9}, "latency": {"repeats": 3}},  # not search parameters (provenance judges those)
])
def test_what_optuna_accepts_resumes(changes: dict) -> None:
    assert space_changes(_study_of(_space()).trials, space_parameters(_space(**changes))) == []


def test_a_queued_trial_with_a_value_the_space_dropped_is_named() -> None:
    """A trial queued for the next run (a re-queued one, DART's paper setting) would fail drawing a value the
    space no longer lists, although no trial stored the parameter yet."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"method": "dart", "layer": 2, "keep_ratio": 0.25})
    study.enqueue_trial({"method": "random", "layer": 2, "keep_ratio": 0.25})
    lines = space_changes(study.get_trials(states=(TrialState.WAITING,)),
                          space_parameters(_space(methods=["random", "pooling"], options=None)))
    assert lines == ["queued trial 0 has method=dart, not in the space's methods [random, pooling]"]


def test_the_refusal_names_the_file_the_study_the_change_and_a_free_name(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    for name in ("tiny", "tiny-2"):
        optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"]).add_trials(
            _study_of(_space(methods=["random", "pooling"], options=None), n=5).trials)
    storage = optuna.storages.RDBStorage(url)
    with pytest.raises(SpaceChanged) as raised:
        check_space_fits(storage, "tiny", _space(methods=["random", "dart"]), url)
    assert str(raised.value) == (
        f"s.yaml: study 'tiny' in {url} was tuned over another search space: methods: stored [random, pooling], "
        "space has [random, dart]. Resume it with the space it was tuned with, or start a new study with "
        "--study tiny-3")
    widened = _space(methods=["random", "pooling"], options=None, layer={"low": 1, "high": 5})
    check_space_fits(storage, "tiny", widened, url)  # a range Optuna accepts
    check_space_fits(storage, "new", _space(methods=["dart"]), url)  # no such study yet: nothing to compare


def test_a_tuning_storage_reads_each_parameter_s_distribution_in_one_query(tmp_path) -> None:
    """The fast read `check_space_fits` uses on a tuning storage gives what a load of every trial gives."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    trials = _study_of(_space(), n=20).trials
    for name, stored in (("s", trials), ("other", _study_of(_space(layer=[1, 2]), n=3).trials)):  # not read
        optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"]).add_trials(stored)
    storage = open_for_tuning(url)
    study_id = storage.get_study_id_from_name("s")
    assert storage.param_distributions(study_id) == stored_distributions(trials)
    with pytest.raises(SpaceChanged, match="layer: stored {low: 1, high: 3}, space has \\[1, 2\\]"):
        check_space_fits(storage, "s", _space(layer=[1, 2]), url)


def test_a_free_study_name() -> None:
    assert free_study_name("a", ["a"]) == "a-2"
    assert free_study_name("a", ["a", "a-2", "a-3", "b"]) == "a-4"


def test_cli_tune_refuses_a_changed_space_before_loading_anything(saved_dirs, tmp_path) -> None:
    """Tune 2 trials, change the methods and run again: one line naming the change and a free study name, exit 2,
    no trial added, and the model never loaded (the second run names a model folder that does not exist)."""
    data = {"study": "tiny", "model": str(saved_dirs["llava"]), "tasks": ["dart_shapes"],
            "subset": {"size": 3, "seed": 0}, "methods": ["random", "pooling"], "layer": [1, 2],
            "keep_ratio": [0.25, 0.5], "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu",
            "batch_size": 3, "sampler": {"name": "random", "seed": 0},
            "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(data))
    storage = f"sqlite:///{tmp_path / 't.db'}"
    first = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", storage, "--trials", "2",
                                     "--no-confirm"])
    assert first.exit_code == 0, first.output
    before = optuna.load_study(study_name="tiny", storage=storage).trials
    assert any(t.state == TrialState.COMPLETE and "method" in t.params for t in before)
    space.write_text(yaml.safe_dump({**data, "methods": ["random", "dart"]}))
    second = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", storage, "--trials", "4",
                                      "--model", str(tmp_path / "no-such-model")])
    assert second.exit_code == 2, second.output
    assert " ".join(second.output.split()) == (
        f"error: {space}: study 'tiny' in {storage} was tuned over another search space: methods: stored "
        "[random, pooling], space has [random, dart]. Resume it with the space it was tuned with, or start a new "
        "study with --study tiny-2")
    after = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [(t.number, t.state) for t in after] == [(t.number, t.state) for t in before]
    # A driver for the changed space is refused before it loads anything (the model path does not exist) ...
    changed = load_space(space).with_overrides(model=str(tmp_path / "no-such-model"))
    with pytest.raises(SpaceChanged, match="methods: stored"):
        Tuner(changed, storage)
    # ... while confirming the front draws nothing from the space, so it needs no driver and goes ahead.
    confirmed = CliRunner().invoke(app, ["confirm", "--space", str(space), "--storage", storage, "--repeats", "2",
                                         "--fresh-limit", "0"])
    assert confirmed.exit_code == 0, confirmed.output
    assert "confirmed: 2 interleaved rounds" in confirmed.output or "nothing to confirm" in confirmed.output
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == len(before)
