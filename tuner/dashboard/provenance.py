"""Provenance of a study in words: what its numbers depend on, and its feasibility constraints."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from tuner.dashboard.studies import state_counts

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")


def markdown_text(text: str) -> str:
    """`text` with every markdown character escaped, for stored text (study names, reasons) shown in a widget that
    renders markdown: it reads as typed, and no image or link in it is loaded by the viewer's browser."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def _task_line(task: Mapping[str, Any]) -> str:
    parts = [str(task.get("name", "?"))]
    if task.get("size") is not None:
        parts.append(f"{task['size']} of {task.get('total', '?')} docs")
    if task.get("seed") is not None:
        parts.append(f"seed {task['seed']}")
    if task.get("stratified_by"):
        parts.append(f"stratified by {task['stratified_by']}")
    if task.get("hash"):
        parts.append(f"subset hash {str(task['hash'])[:12]}")
    if task.get("primary_metric"):
        parts.append(f"metric {task['primary_metric']}")
    return ", ".join(parts)


def constraints_text(constraints: Mapping[str, Any] | None) -> str:
    """The study's feasibility constraints in words ('none' when it has none)."""
    constraints = constraints or {}
    parts = []
    if constraints.get("min_accuracy") is not None:
        parts.append(f"accuracy >= {constraints['min_accuracy']:g}")
    if constraints.get("min_relative_accuracy") is not None:
        parts.append(f"accuracy >= {constraints['min_relative_accuracy']:.0%} of the baseline")
    if constraints.get("max_prefill_ms") is not None:
        parts.append(f"prefill <= {constraints['max_prefill_ms']:g} ms")
    return " and ".join(parts) or "none"


def provenance_rows(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[tuple[str, str]]:
    """(field, value) lines saying what the study's numbers depend on: model, task subset, hardware, attention,
    latency protocol, versions, baseline, constraints and trial counts."""
    attrs = study.user_attrs
    provenance = attrs.get("provenance") or {}
    versions = provenance.get("versions") or {}
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    model = str(provenance.get("model_id", "unknown"))
    if provenance.get("revision"):
        model += f" @ {provenance['revision']}"
    rows = [("model", model), ("family", str(provenance.get("family", "?"))),
            ("device", str(provenance.get("device", "?"))),
            ("attention", str(provenance.get("attn_implementation", "?"))),
            ("dtype", str(provenance.get("dtype", "?")))]
    rows += [("task", _task_line(t)) for t in provenance.get("tasks") or []]
    latency = provenance.get("latency") or {}
    if latency:
        rows.append(("latency protocol", f"{latency.get('new_tokens')} new tokens, median of {latency.get('repeats')} "
                                         f"interleaved repeats after {latency.get('warmup')} warm-up"))
    names = {"torch": "torch", "transformers": "transformers", "lmms_eval": "lmms-eval", "optuna": "optuna",
             "dart_tuner": "dart-tuner", "python": "Python", "cuda": "CUDA"}
    version_text = ", ".join(f"{label} {versions[key]}" for key, label in names.items() if versions.get(key))
    if version_text:
        rows.append(("versions", version_text))
    baseline = attrs.get("baseline") or {}
    if baseline:
        rows.append(("baseline (unpruned)", f"accuracy {baseline['accuracy']:.3f}, prefill "
                                            f"{baseline['prefill_ms']:.1f} ms (trial {baseline.get('trial')})"))
    else:
        rows.append(("baseline (unpruned)", "not measured yet"))
    rows.append(("constraints", constraints_text(attrs.get("constraints"))))
    if attrs.get("space"):
        rows.append(("search space", str(attrs["space"])))
    counts = state_counts(trials)
    rows.append(("trials", ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none yet"))
    return rows
