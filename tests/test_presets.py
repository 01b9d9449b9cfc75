"""Preset files: round trip, and a clear error naming the file for every way one can be broken."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuner import PruningConfig
from tuner.config.preset import SCHEMA_VERSION, Preset, PresetError, load_preset, save_preset


def test_round_trip_keeps_config_metrics_and_provenance(tmp_path: Path) -> None:
    """Saving then loading must give back the same config (options included), metrics and provenance."""
    preset = Preset(config=PruningConfig(method="dart", layer=3, keep_ratio=0.25,
                                         options={"n_image_pivots": 2, "n_text_pivots": 6, "pivot_metric": "l2"}),
                    metrics={"accuracy": 0.9, "prefill_ms_median": 12.5},
                    provenance={"model_id": "m", "family": "llava"})
    loaded = load_preset(save_preset(preset, tmp_path / "p.yaml"))
    assert loaded == preset
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["schema_version"] == SCHEMA_VERSION


# A preset as dart-tuner wrote it before methods owned their options (schema 1): DART's pivots at the top level of
# `config`, shared by every stage, and present (ignored) for other methods too.
SCHEMA_1_PRESET = """\
schema_version: 1
config:
  method: dart
  layer: 2
  keep_ratio: 0.25
  budget: null
  n_image_pivots: 2
  n_text_pivots: 6
  pivot_order: rank
  seed: 0
  options: {pivot_metric: l2}
  require_vision: true
  stages:
  - {layer: 4, keep_ratio: 0.5, method: fastv}
  - {layer: 6, keep_ratio: 0.5, method: dart}
metrics: {accuracy: 0.8}
provenance: {family: llava}
"""


def test_a_schema_1_preset_loads_with_the_pivots_in_dart_options(tmp_path: Path) -> None:
    """Old presets still load: the pivots go to every stage that runs DART with options of its own, none to the
    FastV stage; saving writes the current schema, which reads back the same."""
    preset = load_preset(_write(tmp_path, SCHEMA_1_PRESET))
    config = preset.config
    assert (config.options["n_image_pivots"], config.options["n_text_pivots"]) == (2, 6)
    assert (config.options["pivot_order"], config.options["pivot_metric"]) == ("rank", "l2")
    fastv, dart = config.stage_config(1), config.stage_config(2)
    assert fastv.options == {"alpha": 1.0}
    assert [dart.options[key] for key in ("n_image_pivots", "n_text_pivots", "pivot_order")] == [2, 6, "rank"]
    assert preset.metrics == {"accuracy": 0.8}
    again = load_preset(save_preset(preset, tmp_path / "again.yaml"))
    assert again.config == config and again.schema_version == SCHEMA_VERSION == 2
    assert "n_image_pivots" not in yaml.safe_load((tmp_path / "again.yaml").read_text())["config"]


def test_a_schema_1_preset_of_another_method_drops_the_pivots(tmp_path: Path) -> None:
    text = SCHEMA_1_PRESET.replace("method: dart\n  layer: 2", "method: random\n  layer: 2").replace(
        "  options: {pivot_metric: l2}\n", "").replace("  stages:\n  - {layer: 4, keep_ratio: 0.5, method: fastv}\n"
                                                       "  - {layer: 6, keep_ratio: 0.5, method: dart}\n", "")
    assert load_preset(_write(tmp_path, text)).config == PruningConfig(method="random", layer=2, keep_ratio=0.25)


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    return path


# (file content, words the message must contain); `.ci/drill.py` feeds these to the CLI too.
MALFORMED = [
    ("schema_version: 2\nconfig: {method: dart, keep_ratio: 0.5, n_image_pivots: 2}\n",
     "unknown config key.*n_image_pivots.*belong in options"),
    ("config: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("config: {method: dart, keep_ratio: 0.5}\n", "schema_version"),
    ("schema_version: 99\nconfig: {method: dart, keep_ratio: 0.5}\n", "newer than this dart-tuner"),
    ("schema_version: 1\n", "has no 'config'"),
    ("schema_version: 1\nconfig: {method: dart, keep_ratio: 0.5}\nextra: 1\n", "unknown top-level key"),
    ("schema_version: 1\nconfig: {method: nosuch, keep_ratio: 0.5}\n", "nosuch"),
    ("schema_version: 1\nconfig: {method: dart, keep_ratio: 1.5}\n", "keep_ratio"),
    ("schema_version: 1\nconfig: {method: dart, keep_ratio: 0.5, colour: red}\n", "colour"),
    ("schema_version: 1\nconfig: dart\n", "'config' must be a mapping"),
    ("schema_version: 1\nconfig: {method: dart, keep_ratio: 0.5}\nmetrics: [1]\n", "'metrics' must be a mapping"),
    # nine levels of nine aliases expand to 9**9 strings: refused before expansion, not after gigabytes
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
     + "schema_version: 1\nconfig: {method: dart, keep_ratio: 0.5}\n", "alias \\*a is not allowed"),
    ("schema_version: 1\n" + "# padding\n" * 120_000 + "config: {method: dart, keep_ratio: 0.5}\n",
     "over 1 MiB"),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED)
def test_malformed_presets_are_rejected_by_name(tmp_path: Path, content: str, message: str) -> None:
    """Each defect gets its own message, and every message names the file."""
    path = _write(tmp_path, content)
    with pytest.raises(PresetError, match=message) as error:
        load_preset(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_binary_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PresetError, match="weights.bin.*not a UTF-8 text file"):
        load_preset(path)


def _preset() -> Preset:
    shared = ["dart_shapes"]  # one object referenced twice: yaml would write an alias unless told not to
    return Preset(config=PruningConfig(method="random", layer=2, keep_ratio=0.5),
                  provenance={"tasks": shared, "requested_tasks": shared, "family": "llava"})


def test_saved_presets_have_no_aliases_and_load_back(tmp_path: Path) -> None:
    """The reader refuses aliases, so the writer must never emit one."""
    path = save_preset(_preset(), tmp_path / "p.yaml")
    assert "&" not in path.read_text() and "*" not in path.read_text()
    assert load_preset(path) == _preset()


def test_a_failed_write_leaves_the_previous_preset_intact(tmp_path: Path, monkeypatch) -> None:
    """A full disk (or a stop) midway must not leave a truncated file where a good preset was, nor a temp file."""
    import errno
    import os

    path = save_preset(_preset(), tmp_path / "p.yaml")
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    other = Preset(config=PruningConfig(method="dart", layer=1, keep_ratio=0.1))
    with pytest.raises(PresetError, match="cannot write preset .*p.yaml.*No space left"):
        save_preset(other, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def test_writing_into_a_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="cannot write preset .*nowhere/p.yaml"):
        save_preset(_preset(), tmp_path / "nowhere" / "p.yaml")


def test_missing_preset_names_the_path(tmp_path: Path) -> None:
    """An unreadable file is a PresetError naming it, not a bare FileNotFoundError."""
    with pytest.raises(PresetError, match="missing.yaml"):
        load_preset(tmp_path / "missing.yaml")


def test_apply_pruning_accepts_a_preset(loaded) -> None:
    """`apply_pruning(model, preset)` prunes with the preset's config."""
    import tiny_vlms
    from tuner import apply_pruning

    model, processor = loaded("llava", "sdpa")
    preset = Preset(config=PruningConfig(method="random", layer=1, keep_ratio=0.25))
    inputs = tiny_vlms.make_inputs("llava", processor)
    with apply_pruning(model, preset) as handle:
        tiny_vlms.greedy(model, inputs, 2)
    assert handle.requests[0].n_kept_vision == [preset.config.budget_for(handle.requests[0].n_vision[0])]
