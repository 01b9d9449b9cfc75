"""The family registry: every registered family is complete, found by class and model type, and documented."""

from pathlib import Path

import pytest
import transformers

import tiny_vlms
from tuner.models.families import (
    adapter_for,
    detect_family,
    family_for_model_type,
    family_names,
    get_family,
    registered_families,
)
from tuner.models.processor_budget import check_processor_settings
from tuner.search.space import load_space

ROOT = Path(__file__).parents[1]
FAMILIES = registered_families()


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_family_declares_its_facts(family):
    assert family.model_types and family.class_names and family.hub_id
    assert all(hasattr(transformers, name) for name in family.class_names)
    assert family_for_model_type(family.model_types[0]) is family
    assert all(family_for_model_type(model_type) is family for model_type in family.model_types)
    space = load_space(ROOT / "search_spaces" / family.search_space)
    assert space.model == family.hub_id


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_support_table_in_docs_models_has_a_row_per_family(family):
    rows = [line for line in (ROOT / "docs" / "models.md").read_text().splitlines() if line.startswith("| `")]
    row = next((row for row in rows if f"`{family.class_names[0]}`" in row), None)
    assert row is not None, family.name
    assert row.startswith(f"| `{family.name}` |") and row.endswith(f"| `{family.search_space}` |"), row


@pytest.mark.parametrize("name", tiny_vlms.FAMILIES)
def test_tiny_model_is_detected_and_adapted(name, loaded):
    model, _ = loaded(name, "sdpa")
    family = tiny_vlms.family_of(name)
    assert detect_family(model) == family.name
    adapter = adapter_for(model)
    assert adapter.spec is family and len(adapter.layers) == model.config.get_text_config().num_hidden_layers
    assert adapter.vision_token_ids  # an empty set would pass the subset check below and mark no vision token
    assert set(adapter.vision_token_ids) <= {getattr(model.config, field, None) for field in (
        "image_token_id", "image_token_index", "video_token_id", "video_token_index")}


def test_unknown_family_names_fail_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'nope'.*llava"):
        get_family("nope")
    assert family_for_model_type("llama") is None
    assert len(set(family_names())) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_default_space_offers_the_familys_processor_budget(family, tmp_path):
    """A family with processor settings has its knob in its default space, commented, and uncommenting it gives a
    space whose settings are the family's own (a knob in another family's names would fail at load)."""
    text = (ROOT / "search_spaces" / family.search_space).read_text()
    knob = [line for line in text.splitlines() if line.startswith("# processor:")]
    if not family.processor_settings:
        assert not knob and "# No processor budget setting for this family" in text
        return
    assert len(knob) == 1, family.search_space
    edited = tmp_path / family.search_space
    edited.write_text(text.replace(knob[0], knob[0].removeprefix("# ")))
    space = load_space(edited)
    assert space.processor is not None and set(space.processor.settings) <= set(family.processor_settings)
    check_processor_settings(family, {name: param.choices()[0] for name, param in space.processor.settings.items()})
