"""What a study's numbers depend on (model, tasks, latency settings, versions), and how another worker's differ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tuner.config.environment import environment
from tuner.errors import DartTunerError

if TYPE_CHECKING:
    from tuner.evaluation.tasks import PreparedTask
    from tuner.models.loading import LoadedModel
    from tuner.search.space import SearchSpace

# Provenance fields that must match for two workers' trials to be comparable.
MATCHED_PROVENANCE = ("model_id", "revision", "family", "dtype", "attn_implementation", "device", "tasks")


class ProvenanceMismatch(DartTunerError, ValueError):
    """The study was created on another model / task subset / machine; the message lists each difference."""


def provenance_of(loaded: LoadedModel, tasks: Sequence[PreparedTask], space: SearchSpace) -> dict[str, Any]:
    """What a study's numbers depend on: stored once per study, compared for every later worker."""
    return {**loaded.provenance(),
            "tasks": [{"name": t.name, "primary_metric": t.primary_metric, **t.subset.to_dict()} for t in tasks],
            "latency": {"new_tokens": space.latency.new_tokens, "repeats": space.latency.repeats,
                        "warmup": space.latency.warmup},
            "versions": environment()}


def provenance_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per matched field that differs."""
    return [f"{key}: study has {stored.get(key)!r}, this run has {current.get(key)!r}"
            for key in MATCHED_PROVENANCE if stored.get(key) != current.get(key)]


def check_same_setup(stored: dict[str, Any] | None, current: dict[str, Any], study_name: str, *,
                     allow_mixed: bool) -> list[str]:
    """The differences between a study's stored provenance and this worker's (none for a new study); a
    ProvenanceMismatch listing them unless `allow_mixed`."""
    differences = [] if stored is None else provenance_differences(stored, current)
    if differences and not allow_mixed:
        raise ProvenanceMismatch(f"study {study_name!r} was measured on another setup; refusing to mix its trials "
                                 "with this run's (pass --allow-mixed to do it anyway, or use another --study):\n  "
                                 + "\n  ".join(differences))
    return differences
