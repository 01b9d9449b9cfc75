"""Exporting a study's trial as a preset: every selection rule on a hand-built study, the preset's evidence,
the round trip to the same kept tokens, and mismatch warnings for each kind of difference."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from rich.console import Console
from typer.testing import CliRunner

import tiny_vlms
from tuner import PruningConfig, apply_pruning, load_preset, save_preset
from tuner.cli import app
from tuner.config.environment import environment
from tuner.config.preset import Preset, PresetError, PresetMismatchWarning
from tuner.models.families import detect_family
from tuner.models.loading import device_name
from tuner.pruning.preset_check import preset_differences
from tuner.results.export import NoTrialQualifies, Rule, choose_trial, preset_from_trial
from tuner.results.tables import NOISY_FOOTNOTE, pareto_table

# (accuracy, prefill ms, keep ratio) of the pruned trials 1..5; trial 0 is the baseline (0.80, 100 ms).
POINTS = [(0.78, 60.0, 0.5), (0.74, 40.0, 0.3), (0.70, 30.0, 0.2), (0.60, 20.0, 0.1), (0.79, 90.0, 0.7)]


def _study(storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="hand")
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.80, "prefill_ms": 100.0})
    study.set_user_attr("provenance", {"model_id": "m", "family": "llava", "dtype": "float32",
                                       "attn_implementation": "sdpa", "device": "cpu", "revision": None,
                                       "versions": environment(), "tasks": [{"name": "dart_shapes", "seed": 0}]})
    study.add_trial(optuna.create_trial(values=[0.80, 100.0], user_attrs={"role": "baseline", "config": None}))
    for accuracy, ms, ratio in POINTS:
        config = PruningConfig(method="random", layer=2, keep_ratio=ratio)
        study.add_trial(optuna.create_trial(
            values=[accuracy, ms], params={"method": "random"},
            distributions={"method": CategoricalDistribution(["random"])},
            user_attrs={"config": config.to_dict(), "prefill_ms": ms, "speedup_same_run": 100.0 / ms,
                        "kept_vision_mean": 64 * ratio, "vision_mean": 64.0}))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"failure": "boom"}))
    return study


@pytest.mark.parametrize(("rule", "expected"), [
    (Rule(trial=3), 3),
    (Rule(min_accuracy=0.72), 2),                     # fastest with accuracy >= 0.72
    (Rule(min_relative_accuracy=0.95), 1),            # >= 0.76: trials 1 (60 ms) and 5 (90 ms)
    (Rule(max_prefill_ms=45), 2),                     # most accurate at <= 45 ms
    (Rule(max_prefill_ms=100), 5),
    (Rule(min_accuracy=0.65, max_prefill_ms=35), 3),  # fastest meeting both
])
def test_rules_pick_the_right_trial(rule: Rule, expected: int) -> None:
    """Each rule a deployer uses must pick the trial a hand check picks (and never the baseline)."""
    assert choose_trial(_study(), rule).number == expected


@pytest.mark.parametrize(("rule", "message"), [
    (Rule(min_accuracy=0.9), "Closest"),
    (Rule(max_prefill_ms=5), "Closest"),
    (Rule(trial=0), "baseline"),
    (Rule(trial=6), "fail"),
    (Rule(trial=42), "no trial 42"),
])
def test_no_trial_qualifies_is_explained(rule: Rule, message: str) -> None:
    """When nothing meets the rule the error says so and shows the closest trials, instead of picking one."""
    with pytest.raises(NoTrialQualifies, match=message) as error:
        choose_trial(_study(), rule)
    if message == "Closest":
        assert "#" in str(error.value)


def test_closest_trials_are_the_nearest_misses() -> None:
    """The closest trials for an accuracy floor are the most accurate ones, not arbitrary ones."""
    with pytest.raises(NoTrialQualifies) as error:
        choose_trial(_study(), Rule(min_accuracy=0.9))
    text = str(error.value)
    assert "#5 " in text and "#1 " in text and "#4 " not in text


def test_rule_arguments_are_validated() -> None:
    """Ambiguous rules are rejected rather than silently resolved."""
    with pytest.raises(ValueError, match="choose a trial"):
        Rule()
    with pytest.raises(ValueError, match="not both"):
        Rule(trial=1, min_accuracy=0.5)
    with pytest.raises(ValueError, match="absolute or a relative"):
        Rule(min_accuracy=0.5, min_relative_accuracy=0.9)


def test_preset_carries_metrics_and_provenance(tmp_path: Path) -> None:
    """The exported file holds the config, the metrics next to the baseline's, and where they were measured."""
    study = _study()
    preset = preset_from_trial(study, choose_trial(study, Rule(trial=2)))
    loaded = load_preset(save_preset(preset, tmp_path / "p.yaml"))
    assert loaded.config == PruningConfig(method="random", layer=2, keep_ratio=0.3)
    assert loaded.metrics["accuracy"] == 0.74 and loaded.metrics["baseline_accuracy"] == 0.80
    assert loaded.metrics["prefill_ms_median"] == 40.0 and loaded.metrics["speedup"] == pytest.approx(2.5)
    for key in ("model_id", "revision", "family", "dtype", "attn_implementation", "device", "tasks", "study",
                "trial", "versions"):
        assert key in loaded.provenance, key
    assert loaded.provenance["trial"] == 2 and loaded.provenance["study"] == "hand"
    assert set(loaded.provenance["versions"]) == {"torch", "transformers", "lmms_eval", "optuna", "dart_tuner"}


def test_export_load_apply_round_trip_keeps_the_same_tokens(loaded, tmp_path: Path) -> None:
    """Applying the exported preset must prune exactly as the trial's config did."""
    model, processor = loaded("llava", "sdpa")
    config = PruningConfig(method="dart", layer=2, keep_ratio=0.3,
                           options={"n_image_pivots": 2, "n_text_pivots": 3})
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    with apply_pruning(model, config) as handle:
        tiny_vlms.greedy(model, inputs, 2)
        direct = [k.clone() for k in handle.last_kept]
    study = _study()
    study.add_trial(optuna.create_trial(values=[0.7, 10.0], user_attrs={"config": config.to_dict()}))
    preset = load_preset(save_preset(preset_from_trial(study, study.trials[-1]), tmp_path / "p.yaml"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PresetMismatchWarning)  # the hand-built provenance names model "m"
        with apply_pruning(model, preset) as handle:
            tiny_vlms.greedy(model, inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(direct, handle.last_kept))


def _matching_preset(model: torch.nn.Module) -> Preset:
    parameter = next(model.parameters())
    versions = environment()
    return Preset(config=PruningConfig(method="random", layer=1, keep_ratio=0.5), provenance={
        "model_id": model.config._name_or_path, "family": detect_family(model),
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(parameter.dtype).removeprefix("torch."), "device": device_name(parameter.device),
        "versions": {k: versions[k] for k in ("torch", "transformers", "lmms_eval", "optuna", "dart_tuner")},
        "study": "s", "trial": 1})


@pytest.mark.parametrize(("field", "value"), [
    ("model_id", "llava-hf/llava-1.5-7b-hf"), ("family", "qwen2_vl"), ("attn_implementation", "eager"),
    ("dtype", "bfloat16"), ("device", "NVIDIA H100 80GB HBM3"), ("versions.torch", "2.11.0+cu130"),
    ("versions.transformers", "5.0.0"),
])
def test_each_kind_of_mismatch_warns_by_name(loaded, field: str, value: str) -> None:
    """Applying a preset off its measured stack warns, naming exactly what differs; a match stays silent."""
    model, _ = loaded("llava", "sdpa")
    preset = _matching_preset(model)
    assert preset_differences(model, preset) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_pruning(model, preset).remove()  # no warning when everything matches
    provenance = yaml.safe_load(yaml.safe_dump(preset.provenance))
    if field.startswith("versions."):
        provenance["versions"][field.split(".")[1]] = value
    else:
        provenance[field] = value
    changed = Preset(config=preset.config, provenance=provenance)
    with pytest.warns(PresetMismatchWarning) as record:
        apply_pruning(model, changed).remove()
    message = str(record[0].message)
    assert field.split(".")[-1] in message and value in message
    assert len(preset_differences(model, changed)) == 1


def test_unknown_family_in_a_preset_is_an_error(tmp_path: Path) -> None:
    """A preset for a family this version does not know must not be applied by accident."""
    path = tmp_path / "p.yaml"
    save_preset(Preset(config=PruningConfig(method="dart", keep_ratio=0.5), provenance={"family": "pixtral"}), path)
    preset = load_preset(path)  # the file format is model-free; applying it checks the family
    with pytest.raises(PresetError, match="pixtral"):
        apply_pruning(torch.nn.Linear(1, 1), preset)


def test_export_command(tmp_path: Path) -> None:
    """`dart-tuner export` writes the chosen preset, and exits 2 with the closest trials when none qualifies."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    runner = CliRunner()
    out = tmp_path / "preset.yaml"
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "hand", "--min-relative-accuracy",
                                 "0.9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_preset(out).provenance["trial"] == 2  # >= 0.72: trials 1, 2 and 5; fastest is 2 (40 ms)
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "hand", "--min-accuracy", "0.99"])
    assert result.exit_code == 2 and "Closest" in result.output
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "nope", "--trial", "1"])
    assert result.exit_code == 2 and "hand" in result.output
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "hand", "--trial", "1",
                                 "-o", str(tmp_path / "nowhere" / "p.yaml")])
    assert result.exit_code == 2 and "cannot write preset" in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") <= 1, result.output


# A trial measured on a busy machine: its prefill is the baseline's, but the baseline's rounds of that trial were
# slow, so the speed-up reads 4.79x; and a clean 2x trial. Trials 1..5 of `_study` predate these attributes.
NOISY = {"speedup_same_run": 4.79, "speedup_low": 0.9, "speedup_high": 6.1, "latency_noisy": True,
         "latency_warning": "the baseline's prefill IQR (390.0 ms) is 81% of its median (479.0 ms)"}
CLEAN = {"speedup_same_run": 2.0, "speedup_low": 1.9, "speedup_high": 2.1, "latency_noisy": False,
         "latency_warning": ""}


def _study_with_spread(storage: str) -> optuna.Study:
    """`_study` plus a noisy trial 7 (0.795 at 99 ms) and a clean trial 8 (0.75 at 50 ms), both on the front."""
    study = _study(storage)
    for accuracy, ms, attrs in ((0.795, 99.0, NOISY), (0.75, 50.0, CLEAN)):
        config = PruningConfig(method="random", layer=2, keep_ratio=0.4)
        study.add_trial(optuna.create_trial(values=[accuracy, ms], user_attrs={
            "config": config.to_dict(), "prefill_ms": ms, "prefill_iqr_ms": 3.0, "prefill_repeats": 10, **attrs}))
    return study


def _export(storage: str, trial: int, out: Path) -> str:
    result = CliRunner().invoke(app, ["export", "--storage", storage, "--study", "hand", "--trial", str(trial),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_warns_when_the_spread_hides_the_speedup(tmp_path: Path) -> None:
    """A noisy trial exports with a warning line and its interval in the preset; a clean one exports silently."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study_with_spread(storage)
    output = _export(storage, 7, tmp_path / "noisy.yaml")
    warning = " ".join(output[output.index("warning:"):].split())
    assert "(4.79x)" in output and warning.startswith("warning: trial 7's prefill speed-up 4.79x (interval "
                                                      "0.90-6.10x) is not distinguishable from the latency spread: "
                                                      "the baseline's prefill IQR")
    assert "Re-measure it with more repeats on an idle machine: dart-tuner eval --preset" in warning
    assert "--model m --task dart_shapes --repeats 20" in warning
    metrics = load_preset(tmp_path / "noisy.yaml").metrics
    assert (metrics["speedup"], metrics["speedup_low"], metrics["speedup_high"], metrics["latency_noisy"]) == \
        (4.79, 0.9, 6.1, True) and metrics["latency_warning"] == NOISY["latency_warning"]
    output = _export(storage, 8, tmp_path / "clean.yaml")
    assert "warning" not in output and "(2.00x)" in output
    metrics = load_preset(tmp_path / "clean.yaml").metrics
    assert (metrics["speedup_low"], metrics["speedup_high"], metrics["latency_noisy"]) == (1.9, 2.1, False)


def test_trials_stored_before_the_noise_check_export_and_print_as_before(tmp_path: Path) -> None:
    """Old trials (no interval, no flag) are unknown, not noisy: no warning, None in the preset, no mark."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _study_with_spread(storage)
    output = _export(storage, 2, tmp_path / "old.yaml")
    assert "warning" not in output and "(2.50x)" in output
    metrics = load_preset(tmp_path / "old.yaml").metrics
    assert [metrics[key] for key in ("speedup_low", "speedup_high", "latency_noisy", "latency_warning")] == [None] * 4
    console = Console(width=200, record=True)
    console.print(pareto_table(study))
    lines = console.export_text().splitlines()
    rows = {line.split("│")[1].strip(): line for line in lines if line.count("│") > 2}
    assert "4.79x*" in rows["7"] and "2.50x │" in rows["2"] and "2.00x │" in rows["8"]
    assert lines[-1].strip() == NOISY_FOOTNOTE  # one line under the table


@pytest.mark.parametrize("rule", [Rule(trial=3), Rule(min_accuracy=0.72), Rule(min_relative_accuracy=0.95),
                                  Rule(max_prefill_ms=45), Rule(min_accuracy=0.65, max_prefill_ms=35)])
def test_rule_cli_options_pick_the_same_trial_from_the_command_line(tmp_path: Path, rule: Rule) -> None:
    """The dashboard prints `rule.cli_options()`; pasted into `dart-tuner export` it must choose the same trial."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _study(storage)
    out = tmp_path / "preset.yaml"
    result = CliRunner().invoke(app, ["export", "--storage", storage, "--study", "hand", *rule.cli_options().split(),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_preset(out).provenance["trial"] == choose_trial(study, rule).number


def test_a_schema_1_study_exports_and_prints_with_the_pivots_as_dart_options(tmp_path: Path) -> None:
    """A study stored before methods owned their options (configs with top-level pivots, no `config_schema`,
    parameters named `n_image_pivots`) still reads: its DART trial exports a current-schema preset holding the
    pivots it ran, a FastV trial none, and the Pareto table shows them."""
    import dashboard_study

    from tuner.results import config_of

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    study = dashboard_study.build_study(storage, legacy=True)
    by_number = {t.number: t for t in study.trials}
    assert "config_schema" not in by_number[3].user_attrs and by_number[3].user_attrs["config"]["n_image_pivots"] == 2
    preset = preset_from_trial(study, by_number[3])  # dart, 2 + 3 pivots
    assert (preset.config.options["n_image_pivots"], preset.config.options["n_text_pivots"]) == (2, 3)
    assert preset.schema_version == 2
    assert load_preset(save_preset(preset, tmp_path / "p.yaml")).config == preset.config
    assert config_of(by_number[5]).options == {"alpha": 1.0}  # fastv: the old pivot fields are dropped
    console = Console(width=300, record=True)
    console.print(pareto_table(study))
    assert "n_image_pivots=2 n_text_pivots=3" in console.export_text()
