"""The processor's own vision-token budget: each family's settings change how many vision tokens an image becomes,
the model still runs on them, they are undone after, and a bad setting is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tuner.evaluation.inputs import build_inputs
from tuner.measure.compare import vision_counts
from tuner.models import load_model
from tuner.models.families import get_family, registered_families
from tuner.models.processor_budget import ProcessorSettingError, check_processor_settings, processor_settings

IMAGE = [[Image.new("RGB", (224, 160), "red")]]


@pytest.fixture(scope="module")
def llava(saved_dirs: dict[str, Path]):
    return load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def qwen(saved_dirs: dict[str, Path]):
    return load_model(str(saved_dirs["qwen2_vl"]), dtype="float32", device="cpu", attn_implementation="sdpa")


def _generate(loaded, inputs) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)


def test_llava_image_size_sets_the_vision_tokens_and_the_tower_follows(llava) -> None:
    """Catches a size the processor ignores, a tower that refuses the new size (no interpolation), and a setting
    left behind after the block."""
    vision = llava.model.config.vision_config
    before = vision_counts(llava, build_inputs(llava, ["q"], IMAGE))
    side = vision.image_size - 2 * vision.patch_size
    with processor_settings(llava, {"image_size": side}):
        inputs = build_inputs(llava, ["q"], IMAGE)
        assert vision_counts(llava, inputs) == [(side // vision.patch_size) ** 2]
        assert _generate(llava, inputs).shape[1] == inputs["input_ids"].shape[1] + 2
    after = build_inputs(llava, ["q"], IMAGE)
    assert vision_counts(llava, after) == before
    assert not llava.model.model.vision_tower._forward_pre_hooks  # the interpolation hook is gone


def test_llava_at_its_own_size_is_the_model_as_loaded(llava) -> None:
    plain = build_inputs(llava, ["q"], IMAGE)
    with processor_settings(llava, {"image_size": llava.model.config.vision_config.image_size}):
        same = build_inputs(llava, ["q"], IMAGE)
        assert not llava.model.model.vision_tower._forward_pre_hooks
    assert torch.equal(plain["pixel_values"], same["pixel_values"])


@pytest.mark.parametrize(("family", "settings", "expected"), [
    ("qwen2_vl", {"max_pixels": 64 * 64}, None), ("qwen2_5_vl", {"max_pixels": 64 * 64}, None),
    ("qwen3_vl", {"max_pixels": 64 * 64}, None),
    ("internvl", {"max_patches": 1}, 16),  # one 64 px tile of 16 tokens, no thumbnail (4 tiles + thumbnail: 80)
    ("idefics3", {"longest_edge": 64}, 16),  # one 64 px sub-image (2 x 2 and the global image: 80)
    ("smolvlm", {"longest_edge": 64}, 16),
])
def test_a_smaller_budget_gives_fewer_vision_tokens(saved_dirs: dict[str, Path], family: str, settings: dict,
                                                    expected: int | None) -> None:
    """Catches a setting the processor ignores (its attribute read elsewhere), a model that cannot run on the
    smaller input, and a setting left behind after the block."""
    loaded = load_model(str(saved_dirs[family]), dtype="float32", device="cpu", attn_implementation="sdpa")
    before = vision_counts(loaded, build_inputs(loaded, ["q"], IMAGE))[0]
    with processor_settings(loaded, settings):
        inputs = build_inputs(loaded, ["q"], IMAGE)
        fewer = vision_counts(loaded, inputs)[0]
        assert _generate(loaded, inputs).shape[1] == inputs["input_ids"].shape[1] + 2
    assert 0 < fewer < before
    assert expected is None or fewer == expected
    assert vision_counts(loaded, build_inputs(loaded, ["q"], IMAGE))[0] == before


def test_settings_are_undone_after_an_error(qwen) -> None:
    saved = dict(qwen.processor.image_processor.size)
    with pytest.raises(RuntimeError, match="inside"), processor_settings(qwen, {"max_pixels": 64 * 64}):
        raise RuntimeError("inside")
    assert dict(qwen.processor.image_processor.size) == saved


@pytest.mark.parametrize(("family", "settings", "culprit"), [
    ("llava", {"max_pixels": 1000}, "processor.max_pixels is not a processor setting of family llava (its "
                                    "settings: image_size)"),
    ("qwen2_vl", {"image_size": 224}, "processor.image_size is not a processor setting of family qwen2_vl"),
    ("qwen2_vl", {"max_pixels": 0}, "processor.max_pixels must be a positive integer"),
    ("qwen2_vl", {"max_pixels": True}, "processor.max_pixels must be a positive integer"),
])
def test_a_bad_setting_is_one_line_naming_it(family: str, settings: dict, culprit: str) -> None:
    with pytest.raises(ProcessorSettingError) as caught:
        check_processor_settings(get_family(family), settings)
    assert str(caught.value).startswith(culprit) and "\n" not in str(caught.value)


def test_a_value_the_model_cannot_take_is_refused_before_anything_changes(llava, qwen) -> None:
    patch = llava.model.config.vision_config.patch_size
    with pytest.raises(ProcessorSettingError, match="not a multiple of the vision tower's patch size"):
        with processor_settings(llava, {"image_size": 3 * patch + 1}):
            pass
    with pytest.raises(ProcessorSettingError, match="min_pixels 5000 is above processor.max_pixels 4000"):
        with processor_settings(qwen, {"min_pixels": 5000, "max_pixels": 4000}):
            pass
    images = qwen.processor.image_processor
    with pytest.raises(ProcessorSettingError, match="min_pixels .* is above processor.max_pixels 16"):
        with processor_settings(qwen, {"max_pixels": 16}):  # the loaded min_pixels is above it
            pass
    assert images.size["longest_edge"] != 16
    assert vision_counts(llava, build_inputs(llava, ["q"], IMAGE)) == [llava.model.config.image_seq_length]


def test_every_family_without_settings_says_so() -> None:
    for family in registered_families():
        if not family.processor_settings:
            with pytest.raises(ProcessorSettingError, match=f"family {family.name} .*its settings: none"):
                check_processor_settings(family, {"max_pixels": 1})


def _preset_with(settings: dict, tmp_path: Path):
    from tuner import PruningConfig, load_preset, save_preset
    from tuner.config.preset import Preset

    path = save_preset(Preset(PruningConfig(method="dart", layer=1, keep_ratio=0.5, processor=settings)),
                       tmp_path / "preset.yaml")
    return load_preset(path)


def test_apply_pruning_applies_a_presets_processor_settings_and_undoes_them(llava, tmp_path: Path) -> None:
    """Catches a preset whose processor settings are lost on the way from the file to the processor, or left
    behind when the hooks go."""
    from tuner import apply_pruning

    vision = llava.model.config.vision_config
    side = vision.image_size - 2 * vision.patch_size
    preset = _preset_with({"image_size": side}, tmp_path)
    with apply_pruning(llava.model, preset, processor=llava.processor) as handle:
        inputs = build_inputs(llava, ["q"], IMAGE)
        assert vision_counts(llava, inputs) == [(side // vision.patch_size) ** 2]
        _generate(llava, inputs)
        assert handle.requests[0].stage_kept_vision[-1] == [(side // vision.patch_size) ** 2 // 2]
    assert vision_counts(llava, build_inputs(llava, ["q"], IMAGE)) == [llava.model.config.image_seq_length]
    assert not llava.model.model.vision_tower._forward_pre_hooks


def test_apply_pruning_without_the_processor_is_one_line_naming_the_settings(qwen, tmp_path: Path) -> None:
    from tuner import apply_pruning

    preset = _preset_with({"max_pixels": 64 * 64}, tmp_path)
    with pytest.raises(ValueError, match=r"settings \(max_pixels=4096\): pass the model's processor") as caught:
        apply_pruning(qwen.model, preset)
    assert "\n" not in str(caught.value)
    assert not getattr(qwen.model, "_dart_tuner_handle", None)  # nothing was attached
    with processor_settings(qwen, {"max_pixels": 64 * 64}):  # applied by the caller: the hooks take them as they are
        apply_pruning(qwen.model, preset).remove()
    with pytest.raises(ProcessorSettingError, match="max_pixels=4096 are already applied"):
        with processor_settings(qwen, {"max_pixels": 64 * 64}):
            apply_pruning(qwen.model, _preset_with({"max_pixels": 80 * 80}, tmp_path), processor=qwen.processor)


@pytest.mark.parametrize(("family", "settings"), [
    ("llava", {"image_size": "crop"}), ("qwen2_vl", {"max_pixels": "longest", "min_pixels": 100}),
    ("internvl", {"max_patches": "loaded"}), ("idefics3", {"longest_edge": "loaded"}),
])
def test_a_setting_at_its_loaded_value_is_the_default_processor(saved_dirs: dict[str, Path], family: str,
                                                                settings: dict) -> None:
    """Catches a drawn value equal to the processor's own being kept as a choice: that trial would be labelled and
    fronted as a processor point although its inputs are the default's (and export would refuse a point that
    ports)."""
    from tuner import PruningConfig
    from tuner.models.processor_budget import without_loaded_values

    loaded = load_model(str(saved_dirs[family]), dtype="float32", device="cpu", attn_implementation="sdpa")
    as_loaded = get_family(loaded.family).loaded_processor_settings(loaded.processor)
    assert set(as_loaded) == set(get_family(loaded.family).processor_settings)
    drawn = {name: as_loaded[name] if isinstance(value, str) else value for name, value in settings.items()}
    config = without_loaded_values(loaded, PruningConfig(method="keep_all", processor=drawn))
    assert config.processor == {name: value for name, value in settings.items() if not isinstance(value, str)}
    plain = build_inputs(loaded, ["q"], IMAGE)
    with processor_settings(loaded, {name: as_loaded[name] for name in as_loaded}):
        same = build_inputs(loaded, ["q"], IMAGE)  # every setting at its loaded value: the default's inputs
    assert torch.equal(plain["input_ids"], same["input_ids"])
    assert torch.equal(plain["pixel_values"], same["pixel_values"])
