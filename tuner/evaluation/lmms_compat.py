"""Importing lmms-eval with clear errors for the two ways it breaks: not installed, or a mismatched torchvision."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from tuner.errors import DartTunerError

INSTALL_HINT = "pip install 'dart-tuner[eval]' with torch pinned as a constraint (see the README)"


class LmmsEvalUnavailable(DartTunerError, ImportError):
    """lmms-eval cannot be used in this environment; the message says why and how to fix it."""


def check_torchvision() -> None:
    """Fail clearly when torchvision is installed but cannot load next to this torch.

    lmms-eval depends on torchvision, and pip installs a CUDA build of it even next to a CPU torch; once
    installed, transformers imports it for every image processor, so nothing multimodal works.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
    except Exception as error:  # RuntimeError "operator torchvision::nms does not exist", OSError, ...
        import torch

        raise LmmsEvalUnavailable(
            f"torchvision is installed but cannot load with torch {torch.__version__} ({type(error).__name__}: "
            f"{error}); run `pip uninstall -y torchvision` (dart-tuner does not need it) or install a torchvision "
            "built for this torch") from error


def import_lmms_eval(*submodules: str) -> ModuleType:
    """`lmms_eval` with the named submodules loaded (e.g. "evaluator", "tasks"), or an LmmsEvalUnavailable error.

    Only what is named is imported: `lmms_eval.models` loads entry points, including this package's own.
    """
    check_torchvision()
    try:
        module = importlib.import_module("lmms_eval")
        for name in submodules:
            importlib.import_module(f"lmms_eval.{name}")
    except ImportError as error:
        raise LmmsEvalUnavailable(f"lmms-eval is needed for evaluation but cannot be imported ({error}); "
                                  f"{INSTALL_HINT}") from error
    return module
