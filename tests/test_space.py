"""Search spaces: the shipped YAML files load, every malformed file fails naming the file and the key, and a
space suggests only the parameters a method uses."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import bundled_methods
from tuner.config import PruningConfig
from tuner.config.catalog import method_class
from tuner.search.space import Constraints, SearchSpace, SpaceError, load_space, parse_space

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))
MINIMAL = {"model": "m", "tasks": ["dart_shapes"], "methods": ["dart", "random"], "layer": {"low": 1, "high": 3},
           "keep_ratio": {"low": 0.1, "high": 0.5}}


def _space(**changes: object) -> SearchSpace:
    data = {**MINIMAL, **changes}
    return parse_space({k: v for k, v in data.items() if v is not None}, "test.yaml")


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_load(path: Path) -> None:
    """A shipped space with a typo would fail for every user who starts from it; none uses a deprecated form."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        space = load_space(path)
    assert space.tasks and space.methods and space.trials
    assert space.study


def test_demo_space_uses_the_embedded_model() -> None:
    assert load_space(Path(__file__).parent.parent / "search_spaces" / "demo.yaml").model.startswith("embedded:")


# (change to MINIMAL, words the message must contain); None removes the key.
BAD = [
    ({"model": None}, "model: is required"),
    ({"tasks": []}, "tasks"),
    ({"methods": ["dartt"]}, "methods[0]: must be one of"),
    ({"layer": {"low": 3, "high": 1}}, "layer: low (3) is above high (1)"),
    ({"layer": {"low": -1, "high": 2}}, "layer.low: must be >= 0"),
    ({"layer": {"low": 0, "high": 2}}, "layer: includes 0, where dart cannot run"),
    ({"before_lm": {"methods": ["fastv"], "keep_ratio": 0.5}}, "before_lm.methods[0]: fastv reads layer K-1's"),
    ({"before_lm": {"methods": ["nope"], "keep_ratio": 0.5}}, "before_lm.methods[0]: must be one of none,"),
    ({"before_lm": {"methods": ["random"]}}, "before_lm: needs methods"),
    ({"before_lm": {"methods": [], "keep_ratio": 0.5}}, "before_lm.methods: the list is empty"),
    ({"before_lm": {"methods": ["random"], "keep_ratio": 0.5}, "methods": ["random"], "layer": {"low": 0, "high": 2}},
     "layer: may not include 0 with before_lm"),
    ({"before_lm": {"methods": ["random"], "keep_ratio": {"low": 0.2, "high": 0.8}}, "sampler": {"name": "grid"},
      "keep_ratio": [0.5]}, "before_lm.keep_ratio: the grid sampler needs a list"),
    ({"layer": {"low": 1}}, "layer: a range needs both low and high"),
    ({"layer": "two"}, "layer: must be a mapping"),
    ({"keep_ratio": {"low": 0.0, "high": 0.5}}, "keep_ratio.low: must be > 0"),
    ({"keep_ratio": {"low": 0.1, "high": 1.5}}, "keep_ratio.high: must be <= 1"),
    ({"keep_ratio": {"low": 0.1, "high": 0.5, "log": "yes"}}, "keep_ratio.log: must be true or false"),
    ({"keep_ratio": [0.1, 0.2], "budget": 64}, "give exactly one of keep_ratio and budget"),
    ({"keep_ratio": None}, "give exactly one of keep_ratio and budget"),
    ({"options": {"dart": {"n_image_pivots": 0, "n_text_pivots": 0}}},
     "options.dart: the space allows {'n_image_pivots': 0, 'n_text_pivots': 0}, which is not a valid dart "
     "configuration: dart options n_image_pivots + n_text_pivots must be >= 1"),
    ({"options": {"fastv": ["alpha"]}}, "options.fastv: 'fastv' is not a method of this space"),
    ({"options": {"dart": {"n_image_pivot": 4}}}, "options.dart: unknown option(s) ['n_image_pivot']; dart takes:"),
    ({"options": {"dart": {"n_image_pivots": {"low": -1, "high": 4}}}},
     "options.dart.n_image_pivots.low must be an int >= 0, got -1"),
    ({"options": {"dart": {"n_image_pivots": {"low": 5, "high": 4}}}},
     "options.dart.n_image_pivots: low (5) is above"),
    ({"options": {"dart": {"n_image_pivots": 2.5}}}, "options.dart.n_image_pivots must be an int >= 0, got 2.5"),
    ({"options": {"dart": {"pivot_order": {"low": 1, "high": 2}}}},
     "options.dart.pivot_order: a range needs a numeric"),
    ({"options": {"dart": {"pivot_order": ["rank", "sideways"]}}}, "options.dart.pivot_order[1] must be one of"),
    ({"options": {"dart": {"quota": None}}}, "options.dart.quota: this option has no default search range"),
    ({"options": {"dart": "n_image_pivots"}}, "options.dart: must map option names to ranges"),
    ({"options": ["dart"]}, "options: must be a mapping of method name"),
    ({"options": {"dart": ["n_image_pivots"]}, "n_image_pivots": [2]},
     "n_image_pivots: is given both at the top level and under options.dart"),
    ({"methods": ["dart", "fastv"], "keep_ratio": [0.5], "options": {"fastv": ["alpha"]}, "sampler": {"name": "grid"}},
     "options.fastv.alpha: the grid sampler needs a list of values"),
    ({"keep_ration": 0.2}, "unknown key(s) ['keep_ration']"),
    ({"constraints": {"min_acc": 0.5}}, "constraints: unknown key(s) ['min_acc']"),
    ({"constraints": {"max_prefill_ms": -1}}, "constraints.max_prefill_ms: must be > 0"),
    ({"sampler": {"name": "cmaes"}}, "sampler.name: must be one of"),
    ({"sampler": {"name": "grid"}}, "keep_ratio: the grid sampler needs a list of values"),
    ({"latency": {"new_tokens": 1}}, "latency.new_tokens must be an integer >= 2"),
    ({"trials": 0}, "trials: must be >= 1"),
    ({"early_stopping": {"chunk_size": 0}}, "early_stopping.chunk_size: must be >= 1"),
    ({"early_stopping": {"chunk": 5}}, "early_stopping: unknown key(s) ['chunk']"),
    ({"early_stopping": {"rule": "confident"}}, "early_stopping: needs chunk_size"),
    ({"early_stopping": {"chunk_size": 8, "rule": "bayes"}}, "early_stopping.rule: must be one of exact, confident"),
    ({"early_stopping": {"chunk_size": 8, "level": 0.4}}, "early_stopping.level: must be >= 0.5"),
    ({"early_stopping": {"chunk_size": 8, "level": 1}}, "early_stopping.level: must be < 1"),
    ({"early_stopping": {"chunk_size": 8, "level": "high"}}, "early_stopping.level: must be a number"),
    ({"early_stopping": {"chunk_size": 8, "dominance": "yes"}}, "early_stopping.dominance: must be true or false"),
    ({"batch_size": "8"}, "batch_size: must be an integer"),
    ({"attn_implementation": "flash"}, "attn_implementation: must be one of"),
    ({"subset": {"size": 0}}, "subset.size: must be >= 1"),
    ({"subset": {"seed": "abc"}}, "subset.seed: must be an integer"),
    ({"keep_ratio": float("nan")}, "keep_ratio: must be a finite number"),
    ({"keep_ratio": {"low": 0.1, "high": float("nan")}}, "keep_ratio.high: must be a finite number"),
    ({"constraints": {"min_relative_accuracy": float("nan")}}, "min_relative_accuracy: must be a finite number"),
    ({"timeout_s": float("inf")}, "timeout_s: must be a finite number"),
    ({"study": 5}, "study: must be a study name"),
    ({"study": ""}, "study: must be a study name"),
    ({"methods": ["pdrop"]}, "schedule: is needed exactly when methods lists pdrop"),
    ({"schedule": {"layers": [1, 2], "keep_ratio": 0.5}}, "schedule: is needed exactly when methods lists pdrop"),
    ({"methods": ["pdrop"], "schedule": {"layers": [2], "keep_ratio": 0.5}}, "schedule.layers: must list at least two"),
    ({"methods": ["pdrop"], "schedule": {"layers": [{"low": 1, "high": 3}, 3], "keep_ratio": 0.5}},
     "schedule.layers[1]: its lowest layer 3 must be above the highest of schedule.layers[0] (3)"),
    ({"methods": ["pdrop"], "schedule": {"layers": [1, 2]}}, "schedule: needs layers"),
    ({"methods": ["pdrop"], "schedule": {"layers": [1, 2], "keep_ratio": 1.5}}, "schedule.keep_ratio: must be <= 1"),
    ({"methods": ["pdrop"], "schedule": {"layers": [1, 2], "keep_ratio": 0.5, "shared": "no"}},
     "schedule.shared: must be true or false"),
    ({"methods": ["pdrop"], "schedule": {"layers": [1, 2], "keep_ratio": {"low": 0.2, "high": 0.8}},
      "sampler": {"name": "grid"}, "keep_ratio": [0.5]}, "schedule.keep_ratio: the grid sampler needs a list"),
]


@pytest.mark.parametrize(("change", "words"), BAD, ids=[w for _, w in BAD])
def test_bad_space_names_file_and_key(tmp_path: Path, change: dict, words: str) -> None:
    """The message must point at the culprit, so the user fixes it before a model is loaded."""
    data = {**MINIMAL, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "my_space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError) as error:
        load_space(path)
    assert str(path) in str(error.value)
    assert words in str(error.value)


def test_a_binary_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SpaceError, match="weights.safetensors' is not a UTF-8 text file"):
        load_space(path)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SpaceError, match="broken.yaml' is not valid YAML: line 2, column 1: ") as error:
        load_space(broken)
    assert "\n" not in str(error.value)  # one line, not PyYAML's excerpt with carets
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SpaceError, match="must be a YAML mapping"):
        load_space(listed)


def test_a_space_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    """Read with the presets' reader (tuner.config.yaml_files): a huge file is refused before it is parsed."""
    big = tmp_path / "big.yaml"
    big.write_text("model: m\n" + "# padding\n" * 120_000)
    with pytest.raises(SpaceError, match="big.yaml' is over 1 MiB"):
        load_space(big)


def test_relative_model_and_include_paths_resolve_next_to_the_file(tmp_path: Path) -> None:
    """`./model` in a space means next to the space file, not the current directory of whoever runs it."""
    path = tmp_path / "sub" / "space.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**MINIMAL, "model": "./ckpt", "include_paths": ["tasks"]}))
    space = load_space(path)
    assert space.model == str((tmp_path / "sub" / "ckpt").resolve())
    assert space.include_paths == (str((tmp_path / "sub" / "tasks").resolve()),)
    assert space.study == "space"


def _random_draws(space: SearchSpace, n: int, seed: int) -> Iterator[tuple[optuna.Trial, PruningConfig]]:
    """`n` configurations `space` suggests to a seeded random sampler, each with its trial (told once drawn)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        config = space.suggest(trial)
        study.tell(trial, [0.5, 1.0])
        yield trial, config


def test_options_are_suggested_only_for_their_method() -> None:
    """A trial carrying another method's option params would make TPE model parameters that did nothing; each
    option is drawn as '<method>.<option>' within its range and reaches the configuration."""
    space = _space(methods=["dart", "fastv", "pooling"],
                   options={"dart": {"n_image_pivots": {"low": 1, "high": 8}, "pivot_order": ["rank", "position"]},
                            "fastv": {"alpha": {"low": 0.2, "high": 0.6}}})
    seen = set()
    for trial, config in _random_draws(space, 40, seed=1):
        seen.add(config.method)
        assert config.method == trial.params["method"]
        assert 1 <= config.layer <= 3 and 0.1 <= config.keep_ratio <= 0.5
        option_params = {name for name in trial.params if "." in name}
        expected = {"dart": {"dart.n_image_pivots", "dart.pivot_order"}, "fastv": {"fastv.alpha"}}
        assert option_params == expected.get(config.method, set())
        for name in option_params:
            assert config.options[name.partition(".")[2]] == trial.params[name]
        if config.method == "fastv":
            assert 0.2 <= config.options["alpha"] <= 0.6
        if config.method == "dart":
            assert config.options["n_text_pivots"] == 4  # not searched: the default
    assert seen == {"dart", "fastv", "pooling"}


def test_listed_option_names_take_the_method_default_range() -> None:
    space = _space(methods=["dart", "fastv"], options={"dart": ["n_image_pivots", "pivot_order"], "fastv": ["alpha"]})
    dart = space.options["dart"]
    assert (dart["n_image_pivots"].low, dart["n_image_pivots"].high) == (1, 8)
    assert dart["pivot_order"].values == ("reference", "rank", "position")  # no range declared: all its choices
    assert (space.options["fastv"]["alpha"].low, space.options["fastv"]["alpha"].high) == (0.0, 1.0)


@pytest.mark.parametrize("method", bundled_methods())
def test_every_method_options_default_ranges_draw_valid_configs(method: str) -> None:
    """Each method's declared options: defaults are valid values, and every option with a default search range
    (or choices) can be searched, each draw building a valid configuration of that method."""
    specs = method_class(method).option_specs
    for name, spec in specs.items():
        assert spec.problem(spec.default) is None, f"{method}.{name}: default {spec.default!r} is invalid"
    searchable = [name for name, spec in specs.items() if spec.search is not None or spec.choices is not None]
    space = _space(methods=[method], layer=2, options={method: searchable} if searchable else None)
    for trial, config in _random_draws(space, 8, seed=3):
        assert config.method == method
        assert {name.partition(".")[2] for name in trial.params if "." in name} == set(searchable)
        assert set(config.options) == set(specs)


def test_legacy_top_level_pivots_read_into_the_dart_options() -> None:
    """Spaces written before `options` still load: their top-level pivot counts are DART's options (with a
    FutureWarning saying where they belong now); they mean nothing in a space without DART."""
    with pytest.warns(FutureWarning, match="options: {dart: ...}"):
        space = _space(n_image_pivots={"low": 2, "high": 3}, n_text_pivots=[0, 1])
    assert space.options["dart"]["n_image_pivots"].low == 2 and space.options["dart"]["n_text_pivots"].values == (0, 1)
    with pytest.warns(FutureWarning):
        assert _space(methods=["random"], n_image_pivots=4).options == {}
    with pytest.warns(FutureWarning), pytest.raises(SpaceError, match="at least one|must be >= 1"):
        _space(n_image_pivots=0, n_text_pivots=0)


def test_fixed_values_and_budget() -> None:
    space = _space(keep_ratio=None, budget=[32, 64], layer=2, methods="dart",
                   options={"dart": {"n_image_pivots": [2, 8]}})
    config = space.suggest(optuna.trial.FixedTrial({"method": "dart", "layer": 2, "budget": 64,
                                                    "dart.n_image_pivots": 8}))
    assert (config.budget, config.keep_ratio, config.options["n_image_pivots"]) == (64, None, 8)


def test_grid_enumerates_every_configuration() -> None:
    """The grid sampler must visit each combination once (every method's options in every trial, as the grid
    sampler needs, but a configuration only takes its own method's)."""
    space = _space(keep_ratio=[0.25, 0.5], layer=[1, 2], options={"dart": {"n_image_pivots": [4],
                                                                           "n_text_pivots": [2, 4]}},
                   sampler={"name": "grid"})
    grid = space.grid()
    assert grid == {"method": ["dart", "random"], "layer": [1, 2], "dart.n_image_pivots": [4],
                    "dart.n_text_pivots": [2, 4], "keep_ratio": [0.25, 0.5]}
    from tuner.search.samplers import make_sampler

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(space))
    configs = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        configs.append(json.dumps(space.suggest(trial).to_dict(), sort_keys=True))
        return 0.5, 1.0

    study.optimize(objective, n_trials=100)  # the grid sampler stops the study when the grid is done
    assert len(study.trials) == 16
    assert len(set(configs)) == 2 * 2 * 2 + 2 * 2  # random trials differ only in layer and keep ratio


def test_paper_default_when_the_space_contains_it() -> None:
    """DART's published setting (its class's `paper_setting`): K=2, and 4+4 pivots, as params when searched."""
    assert _space().paper_defaults() == [{"method": "dart", "layer": 2, "keep_ratio": 0.25}]
    searched = _space(options={"dart": {"n_image_pivots": {"low": 1, "high": 8}, "n_text_pivots": [4, 6]}})
    assert searched.paper_defaults() == [{"method": "dart", "layer": 2, "keep_ratio": 0.25,
                                          "dart.n_image_pivots": 4, "dart.n_text_pivots": 4}]
    config = searched.suggest(optuna.trial.FixedTrial(searched.paper_defaults()[0]))
    assert (config.options["n_image_pivots"], config.options["n_text_pivots"], config.layer) == (4, 4, 2)


def test_paper_default_clamps_or_is_absent() -> None:
    """K=2 with 4+4 pivots only when the space allows it; the keep ratio is the closest allowed to 0.25."""
    assert _space(keep_ratio={"low": 0.3, "high": 0.6}).paper_defaults()[0]["keep_ratio"] == 0.3
    assert _space(keep_ratio=[0.1, 0.3]).paper_defaults()[0]["keep_ratio"] == 0.3
    assert _space(keep_ratio=None, budget=[64, 100, 200]).paper_defaults()[0]["budget"] == 100
    assert _space(layer={"low": 3, "high": 5}).paper_defaults() == []
    assert _space(methods=["random"]).paper_defaults() == []
    assert _space(options={"dart": {"n_image_pivots": [8]}}).paper_defaults() == []
    assert _space(options={"dart": {"pivot_order": "rank"}}).paper_defaults() == []  # the reference order is


def test_overrides_ignore_none() -> None:
    space = _space()
    assert space.with_overrides(model=None, trials=7).model == "m"
    assert space.with_overrides(model=None, trials=7).trials == 7


def test_pdrop_schedules_round_trip_through_a_study() -> None:
    """`pdrop` trials are FastV at every stage layer, one keep ratio each, strictly increasing layers; the stored
    config reads back as the same schedule, and only pdrop trials carry schedule parameters."""
    from tuner.config import schedule_text

    space = _space(methods=["dart", "pdrop"], schedule={"layers": [{"low": 1, "high": 2}, [3, 4], 6],
                                                        "keep_ratio": {"low": 0.3, "high": 0.9}})
    assert space.max_layer() == 6
    seen = set()
    for trial, config in _random_draws(space, 20, seed=2):
        seen.add(config.method)
        assert ("pdrop_layer_0" in trial.params) == (trial.params["method"] == "pdrop")
        if trial.params["method"] == "pdrop":
            assert "layer" not in trial.params and "keep_ratio" not in trial.params
            assert config.method == "fastv" and len(config.layers) == 3 and config.layers[-1] == 6
            assert list(config.layers) == sorted(set(config.layers))
            ratios = [config.stage_config(i).keep_ratio for i in range(3)]
            assert ratios == [trial.params[f"pdrop_keep_ratio_{i}"] for i in range(3)]
            assert type(config)(**config.to_dict()) == config
            assert schedule_text(config).startswith(f"fastv@{config.layer}:")
    assert seen == {"dart", "fastv"}
    shared = _space(methods=["pdrop"], layer=None, keep_ratio=None,
                    schedule={"layers": [2, 4], "keep_ratio": [0.5], "shared": True}, sampler={"name": "grid"})
    assert shared.grid() == {"method": ["pdrop"], "pdrop_layer_0": [2], "pdrop_layer_1": [4],
                             "pdrop_keep_ratio": [0.5]}
    config = shared.suggest(optuna.trial.FixedTrial({"method": "pdrop", "pdrop_layer_0": 2, "pdrop_layer_1": 4,
                                                     "pdrop_keep_ratio": 0.5}))
    assert schedule_text(config) == "fastv@2:0.5>4:0.5"


def test_accuracy_floor_is_the_higher_floor_and_asks_for_the_baseline_only_when_relative() -> None:
    """The one rule `Tuner` (early stopping) and `bench-search` (the hypervolume's reference) share."""
    def no_baseline() -> float:
        raise AssertionError("the baseline is not needed without a relative floor")

    assert Constraints().accuracy_floor(no_baseline) is None
    assert Constraints(min_accuracy=0.6, max_prefill_ms=10.0).accuracy_floor(no_baseline) == 0.6
    assert Constraints(min_relative_accuracy=0.9).accuracy_floor(lambda: 0.8) == pytest.approx(0.72)
    assert Constraints(min_accuracy=0.7, min_relative_accuracy=0.9).accuracy_floor(lambda: 0.7) == 0.7
    assert Constraints(min_accuracy=0.7, min_relative_accuracy=0.9).accuracy_floor(lambda: 1.0) == pytest.approx(0.9)


def test_before_lm_stacks_a_k0_stage_under_the_in_lm_trial() -> None:
    """A trial with a before-LM method is that method at K = 0 followed by the in-LM stage, whose keep ratio is a
    share of what K = 0 kept; `none` trials are the in-LM configuration alone and carry no K = 0 share."""
    from tuner.config import schedule_text

    space = _space(methods=["dart", "fastv"],
                   options={"dart": {"n_image_pivots": {"low": 1, "high": 4}, "n_text_pivots": {"low": 0, "high": 4}}},
                   before_lm={"methods": ["none", "random", "pooling"], "keep_ratio": {"low": 0.3, "high": 0.9}})
    seen = set()
    for trial, config in _random_draws(space, 30, seed=3):
        pre = trial.params["before_lm_method"]
        seen.add(pre)
        assert ("before_lm_keep_ratio" in trial.params) == (pre != "none")
        if pre == "none":
            assert config.layers == (trial.params["layer"],) and config.method == trial.params["method"]
            continue
        assert config.layers == (0, trial.params["layer"]) and config.method == pre
        first, second = config.stage_configs()
        assert first.keep_ratio == trial.params["before_lm_keep_ratio"]
        assert (second.method, second.keep_ratio) == (trial.params["method"], trial.params["keep_ratio"])
        assert type(config)(**config.to_dict()) == config
        assert schedule_text(config).startswith(f"{pre}@0:")
    assert seen == {"none", "random", "pooling"}
    config = space.suggest(optuna.trial.FixedTrial({"before_lm_method": "random", "before_lm_keep_ratio": 0.5,
                                                    "method": "dart", "layer": 2, "keep_ratio": 0.25,
                                                    "dart.n_image_pivots": 2, "dart.n_text_pivots": 3}))
    assert schedule_text(config) == "random@0:0.5>dart@2:0.25"
    dart = config.stage_config(1).options
    assert (dart["n_image_pivots"], dart["n_text_pivots"]) == (2, 3)  # the in-LM stage's own options
    assert config.options == {}  # random's: none
    assert [paper["before_lm_method"] for paper in space.paper_defaults()] == ["none"]


def test_a_layer_range_may_start_at_0_when_every_method_can_run_there() -> None:
    space = _space(methods=["random", "pooling"], layer={"low": 0, "high": 2})
    assert space.suggest(optuna.trial.FixedTrial({"method": "random", "layer": 0, "keep_ratio": 0.2})).layer == 0


def test_before_lm_searches_its_methods_options_only_in_their_trials() -> None:
    space = _space(methods=["random"], before_lm={"methods": ["none", "cdpruner", "divprune"], "keep_ratio": 0.5,
                                                  "options": {"cdpruner": {"theta": {"low": 0.1, "high": 0.8}}}})
    for trial, config in _random_draws(space, 20, seed=4):
        drawn = "before_lm.cdpruner.theta" in trial.params
        assert drawn == (trial.params["before_lm_method"] == "cdpruner")
        if drawn:
            assert config.stage_config(0).options["theta"] == trial.params["before_lm.cdpruner.theta"]
            assert config.stage_config(1).method == "random"
    with pytest.raises(SpaceError, match=r"before_lm.options.random: 'random' is not a method of this space"):
        _space(methods=["random"], before_lm={"methods": ["cdpruner"], "keep_ratio": 0.5,
                                              "options": {"random": ["theta"]}})
    with pytest.raises(SpaceError, match=r"before_lm.options.cdpruner: unknown option\(s\) \['thet'\]"):
        _space(methods=["random"], before_lm={"methods": ["cdpruner"], "keep_ratio": 0.5,
                                              "options": {"cdpruner": ["thet"]}})


def test_early_stopping_parses_into_the_measurers_policy() -> None:
    """The section's keys reach the policy unchanged, defaults fill the rest, and no section means off."""
    from tuner.measure.early_stop import EarlyStopping

    space = parse_space({**MINIMAL, "early_stopping": {"chunk_size": 8, "rule": "confident", "level": 0.9,
                                                       "dominance": True}})
    assert space.early_stopping == EarlyStopping(8, "confident", 0.9, True)
    assert parse_space({**MINIMAL, "early_stopping": {"chunk_size": 4}}).early_stopping == EarlyStopping(4)
    assert parse_space(MINIMAL).early_stopping is None
