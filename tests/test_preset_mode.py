"""A saved preset keeps the permissions of the file it replaces, and a new one follows the umask (the atomic
write's private temporary file must not leave every preset 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tuner import PruningConfig
from tuner.config.preset import Preset, save_preset

PRESET = Preset(config=PruningConfig(method="dart", layer=2, keep_ratio=0.25))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_overwriting_keeps_the_replaced_files_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text("old")
    path.chmod(mode)
    save_preset(PRESET, path)
    assert _mode(path) == mode and "dart" in path.read_text()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_new_file_follows_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_preset(PRESET, tmp_path / f"new-{umask:o}.yaml")
    finally:
        os.umask(previous)
    assert _mode(path) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
