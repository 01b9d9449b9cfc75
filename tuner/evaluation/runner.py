"""Accuracy of one pruning configuration on prepared task subsets, with per-sample results and kept-token counts.

The model is loaded once and wrapped once; every `evaluate(config)` runs lmms-eval's `simple_evaluate` on the same
task objects with the same subset, so two configurations are scored on exactly the same questions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.config import PruningConfig
from tuner.evaluation.lmms_compat import import_lmms_eval
from tuner.evaluation.lmms_model import DartTunerLMM, GenerationFailure
from tuner.evaluation.tasks import PreparedTask
from tuner.models.feature_cache import FeatureCache
from tuner.models.loading import LoadedModel


@dataclass(frozen=True)
class SampleResult:
    """One scored document: enough to compare two configurations question by question."""

    task: str
    doc_index: int  # index in the task's full evaluation split
    category: str | None
    prediction: str
    target: str
    score: float | None  # the primary metric of this document, when the task scores documents one by one
    n_vision: int
    n_kept_vision: int
    stage_kept_vision: tuple[int, ...] = ()  # what each stage of a schedule kept (n_kept_vision: the last)


@dataclass
class EvalResult:
    """Accuracy of one configuration on every prepared task."""

    config: PruningConfig | None
    accuracy: float  # mean over tasks of each task's primary metric
    metrics: dict[str, dict[str, float]]  # task -> metric -> value
    samples: list[SampleResult] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why evaluation stopped before the whole subset (tuner.measure.early_stop), if it did

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def scores(self) -> list[tuple[str, int, float]] | None:
        """(task, doc index, score) per sample, for intervals; None when a task does not score documents singly."""
        if not self.samples or any(s.score is None for s in self.samples):
            return None
        return [(s.task, s.doc_index, float(s.score)) for s in self.samples]

    def kept_vision_stats(self) -> dict[str, Any]:
        """Kept vision tokens per sample after the last stage (mean, min, max), the keep ratio achieved over all
        samples and, for a schedule of several stages, `stage_kept_vision_mean`: the mean each stage kept."""
        kept = [s.n_kept_vision for s in self.samples]
        vision = [s.n_vision for s in self.samples]
        if not kept:
            return {"kept_vision_mean": math.nan, "kept_vision_min": math.nan, "kept_vision_max": math.nan,
                    "vision_mean": math.nan, "keep_ratio_achieved": math.nan}
        stats = {"kept_vision_mean": statistics.fmean(kept), "kept_vision_min": float(min(kept)),
                 "kept_vision_max": float(max(kept)), "vision_mean": statistics.fmean(vision),
                 "keep_ratio_achieved": sum(kept) / sum(vision) if sum(vision) else math.nan}
        stages = {len(s.stage_kept_vision) for s in self.samples}
        if len(stages) == 1 and stages.pop() > 1:
            stats["stage_kept_vision_mean"] = [statistics.fmean(column)
                                               for column in zip(*(s.stage_kept_vision for s in self.samples))]
        return stats

    def accuracy_by_category(self) -> dict[str, float]:
        """Mean per-sample score by (task, category), for tasks that score samples one by one."""
        groups: dict[str, list[float]] = {}
        for sample in self.samples:
            if sample.score is not None:
                groups.setdefault(f"{sample.task}/{sample.category}", []).append(sample.score)
        return {key: statistics.fmean(values) for key, values in sorted(groups.items())}

    def to_dict(self, *, with_samples: bool = True) -> dict[str, Any]:
        out = {"config": self.config.to_dict() if self.config else None, "accuracy": self.accuracy,
               "metrics": self.metrics, "n_samples": self.n_samples, "seconds": self.seconds,
               **self.kept_vision_stats(), "accuracy_by_category": self.accuracy_by_category()}
        if with_samples:
            out["samples"] = [asdict(s) for s in self.samples]
        return out


def _numeric_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """'exact_match,none' -> 'exact_match' for the numeric, non-stderr entries of one task's results."""
    out = {}
    for key, value in task_results.items():
        name, _, _ = key.partition(",")
        if "stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
    return out


def _target(sample: dict[str, Any]) -> str:
    target = sample.get("target")
    return target if isinstance(target, str) else str(target)


class Evaluator:
    """Scores pruning configurations on fixed task subsets with one loaded model."""

    def __init__(self, loaded: LoadedModel, tasks: Sequence[PreparedTask], *, batch_size: int = 1,
                 max_failures: int = 0, feature_cache: FeatureCache | None = None) -> None:
        if not tasks:
            raise ValueError("Evaluator needs at least one prepared task")
        self.loaded = loaded
        self.tasks = list(tasks)
        self.lm = DartTunerLMM.from_loaded(loaded, batch_size=batch_size, max_failures=max_failures,
                                           feature_cache=feature_cache)  # image features computed once per document
        self._evaluator = import_lmms_eval("evaluator").evaluator

    @property
    def n_requests(self) -> int:
        return sum(task.subset.size for task in self.tasks)

    def evaluate(self, config: PruningConfig | None, *, on_progress: Callable[[int], None] | None = None,
                 chunk_size: int | None = None,
                 stop_check: Callable[[dict[str, list[float]]], str | None] | None = None) -> EvalResult:
        """Accuracy of `config` (None = unpruned) on every task; a failed generation raises GenerationFailure.

        With `chunk_size`, each task's subset is scored `chunk_size` documents at a time (lmms-eval's offset and
        limit, same documents and order), and after each chunk `stop_check(scores so far by task)` may return a
        reason to stop: the result then holds the chunks scored, with `stopped` set. A task's metrics are then
        the document-weighted mean of its chunks' (exact for metrics that are means of per-document scores).
        """
        self.lm.set_config(config)
        self.lm.records.clear()
        self.lm.on_progress = on_progress
        start = time.perf_counter()
        try:
            if chunk_size is None:
                metrics, samples = self._score(self.tasks)
                stopped = None
            else:
                metrics, samples, stopped = self._score_in_chunks(chunk_size, stop_check)
        finally:
            self.lm.on_progress = None
        samples.sort(key=lambda s: (s.task, s.doc_index))
        primaries = [metrics[task.name][task.primary_metric] for task in self.tasks if task.name in metrics]
        return EvalResult(config=config, accuracy=statistics.fmean(primaries), metrics=metrics, samples=samples,
                          seconds=time.perf_counter() - start, stopped=stopped)

    def _score_in_chunks(self, chunk_size: int, stop_check: Callable[[dict[str, list[float]]], str | None] | None
                         ) -> tuple[dict[str, dict[str, float]], list[SampleResult], str | None]:
        """Score each task chunk by chunk, asking `stop_check` after every chunk (see `evaluate`)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        parts: dict[str, list[tuple[int, dict[str, float]]]] = {}
        samples: list[SampleResult] = []
        scores: dict[str, list[float]] = {}
        stopped = None
        for task in self.tasks:
            for offset in range(0, task.subset.size, chunk_size):
                n = min(chunk_size, task.subset.size - offset)
                chunk_metrics, chunk_samples = self._score([task], limit=n, offset=offset)
                parts.setdefault(task.name, []).append((n, chunk_metrics[task.name]))
                samples.extend(chunk_samples)
                scores.setdefault(task.name, []).extend(s.score for s in chunk_samples if s.score is not None)
                unscored = any(s.score is None for s in chunk_samples)  # no per-document scores: nothing to bound
                finished = task is self.tasks[-1] and offset + n >= task.subset.size  # nothing left to skip
                stopped = None if stop_check is None or unscored or finished else stop_check(scores)
                if stopped:
                    return _weighted_metrics(parts), samples, stopped
        return _weighted_metrics(parts), samples, None

    def _score(self, tasks: Sequence[PreparedTask], *, limit: int | None = None, offset: int = 0
               ) -> tuple[dict[str, dict[str, float]], list[SampleResult]]:
        """One lmms-eval run over `tasks` (documents offset .. offset + limit of each subset, or all of them)."""
        results = self._evaluator.simple_evaluate(
            model=self.lm, tasks=[task.task for task in tasks], task_manager=tasks[0].manager,
            bootstrap_iters=0, log_samples=True, use_cache=None, verbosity="WARNING", limit=limit, offset=offset,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        if results is None:
            raise GenerationFailure("lmms-eval returned no results")
        metrics: dict[str, dict[str, float]] = {}
        samples: list[SampleResult] = []
        for task in tasks:
            task_metrics = _numeric_metrics(results["results"].get(task.name, {}))
            if task.primary_metric not in task_metrics:
                raise GenerationFailure(f"task {task.name} reported no {task.primary_metric!r} "
                                        f"(got {sorted(task_metrics)})")
            metrics[task.name] = task_metrics
            for sample in results.get("samples", {}).get(task.name, []):
                position = int(sample["doc_id"])
                record = self.lm.records.get((task.name, position))
                score = sample.get(task.primary_metric)
                response = sample.get("filtered_resps") or sample.get("resps") or [""]
                while isinstance(response, list):
                    response = response[0] if response else ""
                samples.append(SampleResult(
                    task=task.name, doc_index=task.doc_indices[position], category=task.categories[position],
                    prediction=str(response), target=_target(sample),
                    score=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
                    n_vision=record.n_vision if record else 0, n_kept_vision=record.n_kept_vision if record else 0,
                    stage_kept_vision=record.stage_kept_vision if record else ()))
        return metrics, samples


def _weighted_metrics(parts: dict[str, list[tuple[int, dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Per task, each metric every chunk reported, averaged over the chunks weighted by their documents."""
    merged = {}
    for task, chunks in parts.items():
        keys = set.intersection(*(set(m) for _, m in chunks))
        total = sum(n for n, _ in chunks)
        merged[task] = {key: sum(n * m[key] for n, m in chunks) / total for key in sorted(keys)}
    return merged
