"""Where a configuration runs (`tuner.config.ports`): verdicts per family, method and target; `export --target` on
a stored study (the launch line of a processor point, the one-line refusal of a pruning point naming the nearest
portable trial); `tune --portable`'s restricted space and its one-line errors; the target a study records."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from typer.testing import CliRunner

from tuner import PruningConfig, load_preset
from tuner.cli import app
from tuner.config import Stage
from tuner.config.environment import environment
from tuner.config.ports import (
    ENGINE_VERSIONS,
    TARGETS,
    PortError,
    engine_settings,
    launch_settings,
    launch_text,
    portable_processor_settings,
    verdict,
)
from tuner.models.families import get_family, registered_families
from tuner.results.export import Rule, choose_trial
from tuner.results.ports import TARGET_ATTR, NotPortable, nearest_portable, study_target, trial_verdict
from tuner.search.params import SpaceError
from tuner.search.portable import check_family, portable_space, record_target
from tuner.search.space import parse_space

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
PROCESSOR_POINT = PruningConfig(method="keep_all", processor={"max_pixels": 200704})
DART = PruningConfig(method="dart", layer=2, keep_ratio=0.25)
BEFORE_LM = PruningConfig(method="random", layer=0, keep_ratio=0.3)


# -- verdicts ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [f.name for f in registered_families()])
@pytest.mark.parametrize("config", [DART, BEFORE_LM, PruningConfig(method="keep_all"),
                                    PruningConfig(method="fastv", layer=2, keep_ratio=0.5,
                                                  stages=(Stage(layer=6, keep_ratio=0.5),))])
def test_transformers_runs_every_configuration(family: str, config: PruningConfig) -> None:
    assert verdict(config, family, "transformers").ports


@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize(("config", "part", "why"), [
    (DART, "in-LM pruning: dart at layer 2", "#3394"),
    (BEFORE_LM, "before-the-LM image pruning: random before the LM (K=0)", "#38888"),
])
def test_no_engine_runs_pruning_and_the_reason_names_the_kind(target: str, config: PruningConfig, part: str,
                                                               why: str) -> None:
    """Catches an engine verdict that lets a pruning method through, or a reason that hides which kind it is."""
    for family in ("llava", *QWEN):
        found = verdict(config, family, target)
        assert not found.ports
        assert found.first_blocker().startswith(part) and why in found.first_blocker()
        assert "\n" not in found.first_blocker()


def test_every_stage_of_a_schedule_is_a_part() -> None:
    """A schedule keep_all -> fastv must still be refused: its later stage prunes inside the LM."""
    config = PruningConfig(method="fastv", layer=2, keep_ratio=0.5, stages=(Stage(layer=6, keep_ratio=0.5),))
    found = verdict(config, "qwen2_vl", "vllm")
    assert [p.name for p in found.blockers] == ["in-LM pruning: fastv at layer 2", "in-LM pruning: fastv at layer 6"]


@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("family", QWEN)
def test_keep_all_with_qwen_pixel_budgets_ports(target: str, family: str) -> None:
    config = PruningConfig(method="keep_all", processor={"max_pixels": 200704, "min_pixels": 3136})
    assert verdict(config, family, target).ports
    assert verdict(PruningConfig(method="keep_all"), family, target).ports  # the default processor always ports


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_llava_image_size_does_not_port_and_says_why(target: str) -> None:
    found = verdict(PruningConfig(method="keep_all", processor={"image_size": 96}), "llava", target)
    assert not found.ports
    assert found.first_blocker().startswith("processor.image_size=96: ") and "position embeddings" in \
        found.first_blocker()


def test_a_setting_without_an_engine_fact_does_not_port() -> None:
    """A name with no recorded engine argument for the family must be refused, never passed through unchecked."""
    found = verdict(PruningConfig(method="keep_all", processor={"max_pixels": 200704}), "gemma3", "vllm")
    assert not found.ports and "knows no vllm argument" in found.first_blocker()


def test_engine_facts_name_only_settings_the_families_have() -> None:
    """Every setting an engine fact maps is one the family itself declares: a fact for a name the family lacks
    would let `--portable` search a setting no trial can apply."""
    for target in ("vllm", "sglang"):
        for family in registered_families():
            assert set(engine_settings(target, family.name)) <= set(get_family(family.name).processor_settings), \
                (target, family.name)
        assert ENGINE_VERSIONS[target]


def test_a_bad_target_is_one_line() -> None:
    with pytest.raises(PortError, match="^target must be one of transformers, vllm, sglang, got 'trt'$"):
        verdict(DART, "llava", "trt")


# -- launch settings ---------------------------------------------------------------------------------------------

def test_vllm_launch_passes_the_processor_settings_as_json() -> None:
    config = PruningConfig(method="keep_all", processor={"max_pixels": 200704, "min_pixels": 3136})
    launch = launch_settings(config, "qwen2_vl", "vllm", "Qwen/Qwen2-VL-2B-Instruct")
    argv = shlex.split(launch_text(launch))
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-2B-Instruct"]
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"max_pixels": 200704, "min_pixels": 3136}
    assert launch["engine_version_checked"] == ENGINE_VERSIONS["vllm"] and launch["env"] == {}


def test_sglang_launch_passes_the_image_config_and_its_own_resize_bound() -> None:
    launch = launch_settings(PROCESSOR_POINT, "qwen2_5_vl", "sglang", "Qwen/Qwen2.5-VL-3B-Instruct")
    argv = shlex.split(launch_text(launch))
    assert argv[0] == "SGLANG_IMAGE_MAX_PIXELS=200704" and "--model-path" in argv
    assert json.loads(argv[argv.index("--mm-process-config") + 1]) == {"image": {"max_pixels": 200704}}


def test_a_default_processor_launch_has_no_processor_argument() -> None:
    assert launch_settings(PruningConfig(method="keep_all"), "llava", "vllm", "m")["args"] == ["vllm", "serve", "m"]


def test_launch_refuses_what_does_not_port() -> None:
    with pytest.raises(PortError, match="^in-LM pruning: dart at layer 2"):
        launch_settings(DART, "qwen2_vl", "vllm", "m")


# -- export --target on a stored study ---------------------------------------------------------------------------

# (configuration, accuracy, prefill ms) of trials 1..5; trial 0 is the baseline (0.80, 100 ms).
POINTS = [(DART, 0.78, 40.0), (PROCESSOR_POINT, 0.74, 50.0),
          (PruningConfig(method="keep_all", processor={"max_pixels": 100352}), 0.70, 35.0),
          (BEFORE_LM, 0.60, 30.0), (PruningConfig(method="fastv", layer=2, keep_ratio=0.6), 0.79, 70.0)]


def _study(storage: str, points=POINTS, family: str = "qwen2_vl") -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="q")
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.80, "prefill_ms": 100.0})
    study.set_user_attr("provenance", {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "family": family,
                                       "dtype": "float32", "attn_implementation": "sdpa", "device": "cpu",
                                       "revision": None, "versions": environment(),
                                       "tasks": [{"name": "dart_shapes", "seed": 0}]})
    study.add_trial(optuna.create_trial(values=[0.80, 100.0], user_attrs={"role": "baseline", "config": None}))
    for config, accuracy, ms in points:
        study.add_trial(optuna.create_trial(
            values=[accuracy, ms], params={"method": config.method},
            distributions={"method": CategoricalDistribution(["dart", "keep_all", "random", "fastv"])},
            user_attrs={"config": config.to_dict(), "prefill_ms": ms, "speedup_same_run": 100.0 / ms}))
    return study


def _export(storage: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["export", "--storage", storage, "--study", "q", *args])
    return result.exit_code, result.output


def test_export_target_vllm_writes_the_launch_of_a_processor_point(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    out = tmp_path / "p.yaml"
    code, output = _export(storage, "--trial", "2", "--target", "vllm", "-o", str(out))
    assert code == 0, output
    preset = load_preset(out)
    assert preset.provenance[TARGET_ATTR] == "vllm" and preset.config.processor == {"max_pixels": 200704}
    assert preset.provenance["launch"]["engine_version_checked"] == ENGINE_VERSIONS["vllm"]
    line = (tmp_path / "p.vllm.sh").read_text().splitlines()[-1]
    argv = shlex.split(line)
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-2B-Instruct"]
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"max_pixels": 200704}


def test_export_default_target_is_unchanged(tmp_path: Path) -> None:
    """The default target exports a pruning trial as before: no target recorded, no launch file."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    out = tmp_path / "p.yaml"
    assert _export(storage, "--trial", "1", "-o", str(out))[0] == 0
    assert TARGET_ATTR not in load_preset(out).provenance and not list(tmp_path.glob("*.sh"))


def test_export_refuses_a_dart_point_naming_the_part_and_the_nearest_portable_trial(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    out = tmp_path / "p.yaml"
    code, output = _export(storage, "--trial", "1", "--target", "vllm", "-o", str(out))
    line = " ".join(output.split())  # the console wraps long lines
    assert code == 2 and not out.exists()
    assert line.startswith("error: trial 1 does not run on vllm: in-LM pruning: dart at layer 2")
    # portable front: trials 2 (0.74, 50 ms) and 3 (0.70, 35 ms); trial 1 (0.78, 40 ms) is nearer to 2
    assert "nearest that does: trial 2 (" in line and "accuracy 0.740, prefill 50.0 ms" in line
    assert "--trial 2 --target vllm" in line


def test_a_bounds_rule_offers_what_the_same_rule_picks_among_portable_trials(tmp_path: Path) -> None:
    """The most accurate trial at <= 45 ms is DART (trial 1); among portable trials the same rule picks trial 3
    (0.70, 35 ms), although trial 2 is nearer to trial 1 on the front (what --trial 1 is offered)."""
    study = _study(f"sqlite:///{tmp_path / 's.db'}")
    rule = Rule(max_prefill_ms=45)
    chosen = choose_trial(study, rule)
    assert chosen.number == 1
    assert nearest_portable(study, rule, chosen, "vllm").number == 3
    assert nearest_portable(study, Rule(trial=1), chosen, "vllm").number == 2
    rule = Rule(min_accuracy=0.75)  # no portable trial meets it: the nearest on the portable front
    assert nearest_portable(study, rule, choose_trial(study, rule), "sglang").number == 2


def test_when_no_trial_ports_the_baseline_is_named(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, points=[(DART, 0.78, 40.0), (BEFORE_LM, 0.6, 30.0)])
    code, output = _export(storage, "--trial", "1", "--target", "sglang")
    line = " ".join(output.split())
    assert code == 2 and "only the unpruned baseline at the default processor (trial 0: accuracy 0.800, prefill " \
        "100.0 ms) ports" in line


def test_export_target_refuses_image_size_on_llava(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, points=[(PruningConfig(method="keep_all", processor={"image_size": 96}), 0.7, 50.0)],
           family="llava")
    code, output = _export(storage, "--trial", "1", "--target", "vllm")
    assert code == 2 and "processor.image_size=96: vLLM's LLaVA processor has no such setting" in \
        " ".join(output.split())


# -- tune --portable -------------------------------------------------------------------------------------------------

def _space(**extra) -> dict:
    return {"model": "m", "tasks": ["dart_shapes"], "methods": ["dart", "keep_all", "random"], "layer": [2, 3],
            "keep_ratio": [0.25, 0.5], "options": {"dart": {"n_image_pivots": [2, 4]}}, **extra}


def test_portable_space_searches_keep_all_over_the_settings_the_engine_takes() -> None:
    space = parse_space(_space(processor={"max_pixels": [100352, 200704], "image_size": [96]}), "s.yaml")
    restricted = portable_space(space, "vllm")
    assert restricted.methods == ("keep_all",) and restricted.layer.choices() == [2]
    assert set(restricted.processor.settings) == {"max_pixels"}  # image_size runs on no engine
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    configs = [restricted.suggest(study.ask()) for _ in range(10)]
    assert {c.processor["max_pixels"] for c in configs} == {100352, 200704}
    assert all(verdict(c, "qwen2_vl", "vllm").ports for c in configs)
    assert portable_space(space, "transformers") is space


@pytest.mark.parametrize(("extra", "said"), [
    ({}, "it has no processor section"),
    ({"processor": {"image_size": [96, 112]}}, "its processor section has only image_size"),
])
def test_a_space_with_nothing_portable_fails_in_one_line(extra: dict, said: str) -> None:
    with pytest.raises(SpaceError) as caught:
        portable_space(parse_space(_space(**extra), "s.yaml"), "sglang")
    message = str(caught.value)
    assert message.startswith("s.yaml: --portable sglang: nothing to search") and said in message
    assert "\n" not in message


def test_portable_checks_the_loaded_family() -> None:
    space = portable_space(parse_space(_space(processor={"max_pixels": [100352]}), "s.yaml"), "vllm")
    check_family(space, "vllm", "qwen2_5_vl")  # takes it
    with pytest.raises(SpaceError, match="^s.yaml: --portable vllm: processor.max_pixels does not port"):
        check_family(space, "vllm", "llava")


def test_a_bad_portable_target_is_one_line() -> None:
    with pytest.raises(SpaceError, match="^--portable: target must be one of"):
        portable_space(parse_space(_space(), "s.yaml"), "tensorrt")


def test_portable_processor_settings_are_per_family() -> None:
    assert portable_processor_settings("vllm", "qwen3_vl") == {"max_pixels", "min_pixels"}
    assert portable_processor_settings("sglang", "llava") == frozenset()
    assert set(TARGETS) == {"transformers", "vllm", "sglang"}


def test_a_new_study_records_its_target_and_a_resumed_one_keeps_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="new")
    record_target(study, "vllm")
    study.set_user_attr("provenance", {"family": "qwen2_vl"})  # what the Tuner stores next, marking it not new
    assert study_target(optuna.load_study(study_name="new", storage=storage)) == "vllm"
    record_target(study, "transformers")  # resumed (its space unchanged, `space_changes`): the target stays
    assert study_target(optuna.load_study(study_name="new", storage=storage)) == "vllm"
    plain = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="plain")
    record_target(plain, "transformers")
    assert TARGET_ATTR not in plain.user_attrs and study_target(plain) == "transformers"


def test_the_docs_table_cites_the_versions_the_facts_were_checked_against() -> None:
    """The port table in docs/serving.md must be updated with the facts: it names each engine's checked version."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text(encoding="utf-8")
    table = text[text.index("## Where a point runs"):]
    assert f"vLLM {ENGINE_VERSIONS['vllm'].split()[0]}" in table
    assert ENGINE_VERSIONS["sglang"].split(" (")[0].removeprefix("main at ") in table  # 'commit 02065f0'


def test_transformers_needs_no_family(tmp_path: Path) -> None:
    """A study without a recorded family still runs everything on transformers (the dashboard's default view)."""
    study = _study(f"sqlite:///{tmp_path / 's.db'}")
    study.set_user_attr("provenance", {})
    assert all(trial_verdict(study, t, "transformers").ports for t in study.trials)
    with pytest.raises(NotPortable, match="records no model family"):
        trial_verdict(study, study.trials[1], "vllm")
