"""Shared fixtures: offline environment and tiny VLMs of every family, saved once and reloaded per attention."""

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# datasets caches the bundled task's JSON here, not in ~/.cache (set before anything imports datasets).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dart_tuner_hf_home_")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedModel, ProcessorMixin  # noqa: E402

import tiny_vlms  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

Loader = Callable[[str, str], tuple[PreTrainedModel, ProcessorMixin]]


def bundled_methods() -> tuple[str, ...]:
    """Every pruning method dart-tuner ships (`available_methods()` less those the tests register): a test that
    iterates over these covers a new method file without being edited."""
    from tuner.pruning import available_methods, get_method_class

    return tuple(m for m in available_methods() if get_method_class(m).__module__.startswith("tuner.pruning.methods."))


@pytest.fixture(scope="session")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build and save every family once per session."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    for family in tiny_vlms.FAMILIES:
        tiny_vlms.build_and_save(family, root / family)
    return {family: root / family for family in tiny_vlms.FAMILIES}


@pytest.fixture(scope="session")
def loaded(saved_dirs: dict[str, Path]) -> Loader:
    """Reload each (family, attention implementation) pair once per session and share it between tests."""
    cache: dict[tuple[str, str], tuple[PreTrainedModel, ProcessorMixin]] = {}

    def get(family: str, attn_implementation: str) -> tuple[PreTrainedModel, ProcessorMixin]:
        key = (family, attn_implementation)
        if key not in cache:
            cache[key] = tiny_vlms.load(family, saved_dirs[family], attn_implementation=attn_implementation)
        return cache[key]

    return get


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """What the dashboard's download buttons serve, by file name (AppTest keeps no media files after a run)."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    served: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):  # noqa: ANN001, ANN202
        served[filename] = path_or_data.encode() if isinstance(path_or_data, str) else path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return served
