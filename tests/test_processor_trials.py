"""A configuration with processor settings, measured as a trial: evaluated and timed on the documents processed
under its settings (fewer vision tokens), and a space's processor section drawn, checked and refused in one line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tuner.config import PruningConfig
from tuner.config.workload import Workload
from tuner.evaluation.tasks import load_tasks
from tuner.measure.trial import TrialMeasurer
from tuner.models.loading import load_model
from tuner.search.processor_space import check_processor_space
from tuner.search.space import SpaceError, parse_space

TASK = "dart_shapes"


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks([TASK], subset_size=4, seed=0)


def test_a_downsampled_trial_sees_fewer_vision_tokens_everywhere(model_and_tasks) -> None:
    """Catches processor settings ignored by evaluation or by the timed inputs (a 'downsample' point that is the
    baseline in disguise), and settings left on the processor after the trial."""
    loaded, tasks = model_and_tasks
    vision = loaded.model.config.vision_config
    side = vision.image_size - 2 * vision.patch_size
    measurer = TrialMeasurer(loaded, tasks, Workload(batch_size=2, new_tokens=2, repeats=1, warmup=0))
    base = measurer.measure(None)
    small = measurer.measure(PruningConfig(method="keep_all", processor={"image_size": side}))
    per_image = (side // vision.patch_size) ** 2
    assert small.vision_mean == per_image and small.kept_vision_mean == per_image
    assert base.vision_mean == loaded.model.config.image_seq_length
    assert small.latency_input_kept_vision == per_image < base.latency_input_kept_vision
    assert small.latency_input_vision == per_image and base.latency_input_vision == base.latency_input_kept_vision
    pruned = measurer.measure(PruningConfig(method="random", layer=1, keep_ratio=0.5, processor={"image_size": side}))
    assert pruned.latency_input_vision == per_image and pruned.latency_input_kept_vision == per_image // 2
    assert small.flops_ratio < 1.0
    assert measurer.measure(None).vision_mean == base.vision_mean  # nothing left behind


def _space(processor: dict) -> dict:
    return {"model": "m", "tasks": [TASK], "methods": ["keep_all", "random"], "layer": 1, "keep_ratio": [0.5],
            "processor": processor}


def test_a_space_draws_processor_settings_into_each_configuration() -> None:
    space = parse_space({**_space({"image_size": [96, 112]}), "sampler": {"name": "grid"}}, "s.yaml")
    assert space.grid()["processor.image_size"] == [96, 112]
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {space.suggest(study.ask()).processor["image_size"] for _ in range(20)}
    assert seen == {96, 112}


@pytest.mark.parametrize(("processor", "culprit"), [
    ({"image_size": []}, "s.yaml: processor.image_size: the list of values is empty"),
    ({"image_size": {"low": 64}}, "s.yaml: processor.image_size: a range needs both low and high"),
    ({"image_size": {"low": 64, "high": 128, "step": 8, "log": True}}, "s.yaml: processor.image_size: give step or"),
    ({"image_size": 0}, "s.yaml: processor.image_size"),
])
def test_a_bad_processor_section_is_one_line_naming_it(processor: dict, culprit: str) -> None:
    with pytest.raises(SpaceError) as caught:
        parse_space(_space(processor), "s.yaml")
    assert str(caught.value).startswith(culprit) and "\n" not in str(caught.value)


def test_a_setting_the_family_lacks_is_refused_before_any_trial(model_and_tasks) -> None:
    loaded, _ = model_and_tasks
    with pytest.raises(SpaceError, match="^s.yaml: processor.max_pixels is not a processor setting of family llava"):
        check_processor_space(parse_space(_space({"max_pixels": [1000]}), "s.yaml").processor, loaded, "s.yaml")
    patch = loaded.model.config.vision_config.patch_size
    with pytest.raises(SpaceError, match="not a multiple of the vision tower's patch size"):
        space = parse_space(_space({"image_size": {"low": 4 * patch, "high": 6 * patch, "step": patch // 2}}),
                            "s.yaml")
        check_processor_space(space.processor, loaded, "s.yaml")


def test_the_feature_cache_never_serves_one_settings_features_to_another(model_and_tasks) -> None:
    """Catches a cache key that misses the processor settings: the default processor's trial would then answer
    from the downsampled images' features (or the reverse)."""
    from tuner.models.feature_cache import FeatureCache

    loaded, tasks = model_and_tasks
    side = loaded.model.config.vision_config.image_size - 2 * loaded.model.config.vision_config.patch_size
    workload = Workload(batch_size=1, new_tokens=2, repeats=1, warmup=0)
    plain = TrialMeasurer(loaded, tasks, workload).measure(None)
    cached = TrialMeasurer(loaded, tasks, workload, feature_cache=FeatureCache.from_mb(64))
    cached.measure(PruningConfig(method="keep_all", processor={"image_size": side}))
    again = cached.measure(None)
    assert again.samples == plain.samples and again.vision_mean == plain.vision_mean


def test_a_budget_above_the_fewest_tokens_a_processor_setting_gives_is_refused(model_and_tasks) -> None:
    """Catches budgets checked at the default processor only: at the smaller image size such a budget keeps
    every token, so those trials would be plain downsampling labelled as pruning."""
    from tuner.search.setup import MeasuringSetup

    loaded, tasks = model_and_tasks
    vision = loaded.model.config.vision_config
    side = vision.image_size - 2 * vision.patch_size
    per_image = (side // vision.patch_size) ** 2
    data = {**_space({"image_size": [side, vision.image_size]}), "keep_ratio": None, "budget": [per_image + 1],
            "latency": {"repeats": 1, "warmup": 0, "new_tokens": 2}}
    space = parse_space({k: v for k, v in data.items() if v is not None}, "s.yaml")
    with pytest.raises(SpaceError) as caught:
        MeasuringSetup.load(space, loaded=loaded, tasks=tasks)
    assert str(caught.value) == (f"s.yaml: budget: the space allows up to {per_image + 1}, more than the {per_image} "
                                 f"vision tokens of the latency prompt ({TASK}, first document at processor.image_size "
                                 f"{side})")
    data["budget"] = [per_image]
    MeasuringSetup.load(parse_space({k: v for k, v in data.items() if v is not None}, "s.yaml"), loaded=loaded,
                        tasks=tasks)


def test_eval_runs_every_configuration_under_the_processor_settings(saved_dirs: dict[str, Path], tmp_path) -> None:
    """`dart-tuner eval --method keep_all --processor image_size=N` is the plain-downsampling point next to the
    baseline. Catches settings dropped on the way (the point would be the baseline again) and a setting the family
    lacks passing silently."""
    import json

    from typer.testing import CliRunner

    from tuner.cli import app
    from tuner.models.families.tiny import CLIP_IMAGE_SIZE, CLIP_PATCH

    side = CLIP_IMAGE_SIZE - 2 * CLIP_PATCH
    out = tmp_path / "out.json"
    common = ["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--limit", "2", "--repeats", "1",
              "--warmup", "0", "--new-tokens", "2", "--max-failures", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*common, "--method", "keep_all", "--processor", f"image_size={side}",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    base, small = json.loads(out.read_text())["rows"]
    assert small["name"] == f"keep_all [image_size={side}]" and small["config"]["processor"] == {
        "image_size": side}
    assert small["cost"]["n_vision"] == (side // CLIP_PATCH) ** 2 < base["cost"]["n_vision"]
    wrong = CliRunner().invoke(app, [*common, "--method", "keep_all", "--processor", "max_pixels=4096"])
    assert wrong.exit_code == 2 and "processor.max_pixels is not a processor setting of family llava" in " ".join(
        wrong.output.split())


def test_settings_that_cannot_go_together_are_refused_before_any_trial(saved_dirs: dict[str, Path]) -> None:
    """Catches a min_pixels range reaching above a max_pixels range passing the check: every trial drawing such a
    pair would fail, one by one, instead of the space in one line."""
    qwen = load_model(str(saved_dirs["qwen2_vl"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    data = {**_space({"min_pixels": [3136, 40000], "max_pixels": [20000, 80000]}), "methods": ["keep_all"]}
    with pytest.raises(SpaceError, match="^s.yaml: processor.min_pixels 40000 is above processor.max_pixels 20000"):
        check_processor_space(parse_space(data, "s.yaml").processor, qwen, "s.yaml")
    data["processor"] = {"min_pixels": [3136, 10000], "max_pixels": [20000, 80000]}
    check_processor_space(parse_space(data, "s.yaml").processor, qwen, "s.yaml")
