"""Versions of the stack a measurement was taken on (stored with studies, presets and `eval --json`)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

_PACKAGES = {"torch": "torch", "transformers": "transformers", "lmms_eval": "lmms-eval", "optuna": "optuna",
             "dart_tuner": "dart-tuner"}


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Library versions, Python and the machine (CPU model only as the platform string)."""
    import torch

    versions: dict[str, Any] = {key: package_version(dist) for key, dist in _PACKAGES.items()}
    versions["torch"] = str(torch.__version__)  # the local build tag (+cpu, +cu130) matters for timings
    versions["cuda"] = torch.version.cuda
    versions["python"] = platform.python_version()
    versions["platform"] = platform.platform()
    versions["cpu_threads"] = torch.get_num_threads()
    return versions
