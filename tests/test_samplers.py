"""The samplers see the study the way their model needs: the parameterless baseline does not empty their space."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

from tuner.search.samplers import TrialSeededSampler

DISTRIBUTIONS = {"method": CategoricalDistribution(["dart", "random"]), "layer": IntDistribution(1, 4),
                 "keep_ratio": FloatDistribution(0.05, 0.5)}


def _study(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """A study as `tune` leaves it: the unpruned baseline first (no parameters), then pruned trials."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.add_trial(create_trial(values=[0.9, 50.0], params={}, distributions={}))
    for i, (method, layer, ratio) in enumerate([("dart", 2, 0.1), ("random", 3, 0.3), ("dart", 1, 0.45),
                                                 ("random", 4, 0.2)]):
        study.add_trial(create_trial(values=[0.5 + i / 10, 20.0 + i], params={
            "method": method, "layer": layer, "keep_ratio": ratio}, distributions=DISTRIBUTIONS))
    return study


# NSGA-II draws its first generation (population 50) independently, so its relative sample is still empty here.
@pytest.mark.parametrize("build, samples_relative", [
    (lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=2), True),
    (lambda seed: optuna.samplers.NSGAIISampler(seed=seed), False)], ids=["gp", "nsga2"])
def test_model_based_samplers_model_the_pruned_trials_parameters(build, samples_relative):
    sampler = TrialSeededSampler(build, seed=0)
    study = _study(sampler)
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    assert set(sampler.infer_relative_search_space(study, frozen)) == set(DISTRIBUTIONS)
    # Optuna's own sampler, given the whole study, finds nothing to model: the baseline has no parameters.
    assert build(0).infer_relative_search_space(study, frozen) == {}
    params = sampler.sample_relative(study, frozen, sampler.infer_relative_search_space(study, frozen))
    assert set(params) <= set(DISTRIBUTIONS)
    assert set(params) == (set(DISTRIBUTIONS) if samples_relative else set())  # GP models all three, not none


def test_tpe_sees_the_whole_study():
    sampler = TrialSeededSampler(lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True), 0)
    study = _study(sampler)
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    inner = sampler._for(frozen)
    assert len(study.trials) == 6 and isinstance(inner, optuna.samplers.TPESampler)
    from tuner.search.samplers import _model_view

    assert _model_view(study, inner) is study


def test_the_model_view_leaves_out_parameterless_trials_however_a_sampler_reads_them():
    from tuner.search.samplers import _ParameterisedTrials

    study = _study(optuna.samplers.RandomSampler(seed=0))
    view = _ParameterisedTrials(study)
    assert len(study.trials) == 5
    for trials in (view.trials, view.get_trials(), view._get_trials(deepcopy=False)):
        assert [t.number for t in trials] == [1, 2, 3, 4]
    assert view.directions == study.directions  # everything else is the study's own


@pytest.mark.parametrize(("trials", "options", "startup"), [
    (20, {}, 4), (100, {}, 10), (8, {}, 3), (None, {}, 10), (20, {"n_startup_trials": 7}, 7)])
def test_tpe_start_up_follows_the_budget_unless_the_space_sets_it(trials, options, startup):
    """Catches a 20-trial study spending half its budget at random, or a user's n_startup_trials overridden."""
    from tuner.search.samplers import make_sampler
    from tuner.search.space import parse_space

    data = {"model": "m", "tasks": ["dart_shapes"], "methods": ["dart"], "layer": [2, 4], "keep_ratio": [0.1, 0.5],
            "trials": trials, "sampler": {"name": "tpe", "seed": 0, "options": options}}
    sampler = make_sampler(parse_space(data, "s.yaml"))
    assert sampler._first._n_startup_trials == startup
