"""Finding lmms-eval tasks (built-in, bundled or from user folders) and cutting seeded, stratified subsets.

lmms-eval's `--limit` takes a prefix of the documents, which for many benchmarks is one category. A tuning
subset is instead drawn per category (proportional allocation, seeded), and recorded by seed and by a hash of
its documents, so two studies can tell whether they scored the same questions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import DartTunerError
from tuner.evaluation.lmms_compat import import_lmms_eval

BUNDLED_TASKS_DIR = Path(__file__).parent / "bundled_tasks"
BUNDLED_TASKS = ("dart_shapes",)
# Fields tried, in order, as the category to stratify by when a task's metadata names none.
CATEGORY_FIELDS = ("category", "question_type", "l2-category", "subtask", "type")


class TaskFailed(DartTunerError, RuntimeError):
    """A task's own hook (doc_to_text, doc_to_visual) raised on one of its documents; the message names both."""


class TaskNotFoundError(DartTunerError, ValueError):
    """A task name no index knows; the message suggests close names."""


@dataclass(frozen=True)
class SubsetInfo:
    """Which documents of a task were scored: enough to recognise the same subset elsewhere."""

    size: int
    total: int
    seed: int
    stratified_by: str | None
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "total": self.total, "seed": self.seed, "stratified_by": self.stratified_by,
                "hash": self.hash}


@dataclass
class PreparedTask:
    """An lmms-eval task object restricted to its subset, plus what is needed to read its results."""

    name: str
    task: Any  # lmms_eval.api.task.ConfigurableTask, its eval split replaced by the subset
    doc_indices: list[int]  # subset position -> index in the full split
    categories: list[str | None]  # per subset position
    subset: SubsetInfo
    primary_metric: str
    higher_is_better: bool
    manager: Any = None  # the TaskManager that found it; simple_evaluate builds a slow default one without it


def _task_manager(include_paths: Sequence[str | Path], include_defaults: bool) -> Any:
    lmms_eval = import_lmms_eval("tasks")
    paths = [str(BUNDLED_TASKS_DIR), *(str(Path(p).expanduser()) for p in include_paths)]
    for path in paths[1:]:
        if not Path(path).is_dir():
            raise TaskNotFoundError(f"task include path {path!r} is not a directory")
    return lmms_eval.tasks.TaskManager("WARNING", include_path=paths, include_defaults=include_defaults)


def task_manager_for(names: Sequence[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """A TaskManager that knows every name: bundled and user folders first, lmms-eval's 2,000 built-ins if needed."""
    if not names:
        raise TaskNotFoundError("no task given")
    manager = _task_manager(include_paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = _task_manager(include_paths, include_defaults=True)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TaskNotFoundError(f"unknown task {name!r}: not bundled ({', '.join(BUNDLED_TASKS)}), not in "
                                    f"lmms-eval's index, not in the include paths{hint}")
    return manager


def _leaf_tasks(task_dict: dict) -> list[tuple[str, Any]]:
    """(name, task) for every task under a possibly nested group dict."""
    leaves = []
    for key, value in task_dict.items():
        if isinstance(value, dict):
            leaves.extend(_leaf_tasks(value))
        elif isinstance(value, tuple):
            if value[1] is not None:
                leaves.append((key if isinstance(key, str) else key.group_name, value[1]))
        else:
            leaves.append((key if isinstance(key, str) else str(key), value))
    return leaves


def stratified_indices(categories: Sequence[str | None], size: int | None, seed: int) -> list[int]:
    """`size` indices drawn per category in proportion to its share (largest remainder), seeded; sorted.

    None (or a size >= the number of documents) keeps everything. Every category keeps at least one document
    when the size allows it, so a small subset still covers every kind of question.
    """
    total = len(categories)
    if size is None or size >= total:
        return list(range(total))
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    groups: dict[str | None, list[int]] = {}
    for index, category in enumerate(categories):
        groups.setdefault(category, []).append(index)
    keys = sorted(groups, key=lambda k: (k is None, str(k)))
    exact = {k: size * len(groups[k]) / total for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    if size >= len(keys):
        for k in keys:
            quota[k] = max(quota[k], 1)
    while sum(quota.values()) > size:  # the minimum of one took too many: shrink the largest
        largest = max(keys, key=lambda k: (quota[k], str(k)))
        quota[largest] -= 1
    by_remainder = sorted(keys, key=lambda k: (-(exact[k] - int(exact[k])), str(k)))
    i = 0
    while sum(quota.values()) < size:
        k = by_remainder[i % len(keys)]
        if quota[k] < len(groups[k]):
            quota[k] += 1
        i += 1
    rng = random.Random(seed)
    chosen = [index for k in keys for index in rng.sample(groups[k], quota[k])]
    return sorted(chosen)


def subset_hash(name: str, indices: Sequence[int], docs: Sequence[dict]) -> str:
    """sha256 over the task name, the chosen indices and those documents' content (media left out)."""
    digest = hashlib.sha256(name.encode())
    for index, doc in zip(indices, docs, strict=True):
        digest.update(json.dumps([index, doc], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _category_field(task: Any, columns: Sequence[str]) -> str | None:
    metadata = task.config.metadata if isinstance(getattr(task.config, "metadata", None), dict) else {}
    named = metadata.get("category_field")
    if named:
        if named not in columns:
            raise ValueError(f"task {task.config.task}: metadata.category_field {named!r} is not a document field")
        return named
    return next((field for field in CATEGORY_FIELDS if field in columns), None)


def _split_name(task: Any) -> str:
    if task.has_test_docs():
        return task.config.test_split
    if task.has_validation_docs():
        return task.config.validation_split
    raise ValueError(f"task {task.config.task} has neither test nor validation documents")


def _primary_metric(task: Any) -> tuple[str, bool]:
    metrics = task.config.metric_list or []
    if not metrics:
        raise ValueError(f"task {task.config.task} defines no metric_list, so there is no accuracy to tune for")
    first = metrics[0]
    return first["metric"], bool(first.get("higher_is_better", True))


def prepare_task(name: str, task: Any, *, subset_size: int | None, seed: int,
                 exclude: Sequence[int] = ()) -> PreparedTask:
    """Restrict `task`'s evaluation split to a seeded stratified subset, in place, and describe it. Documents in
    `exclude` (indices of the full split) are never drawn: a subset disjoint from another one."""
    split = _split_name(task)
    docs_no_media = task.dataset_no_image[split]
    field = _category_field(task, docs_no_media.column_names)
    all_categories = [None if field is None else str(c) for c in
                      (docs_no_media[field] if field else [None] * len(docs_no_media))]
    excluded = set(exclude)
    allowed = [i for i in range(len(all_categories)) if i not in excluded]
    if not allowed:
        raise TaskNotFoundError(f"task {name}: no documents left outside the {len(excluded)} excluded ones")
    if subset_size is not None and subset_size > len(allowed):
        logging.getLogger(__name__).warning("task %s: --limit %d is more than its %d documents; using all %d",
                                            name, subset_size, len(allowed), len(allowed))
    indices = [allowed[i] for i in stratified_indices([all_categories[i] for i in allowed], subset_size, seed)]
    digest = subset_hash(name, indices, docs_no_media.select(indices).to_list())
    shared = task.dataset_no_image is task.dataset
    task.dataset[split] = task.dataset[split].select(indices)
    if not shared:
        task.dataset_no_image[split] = docs_no_media.select(indices)
    metric, higher = _primary_metric(task)
    info = SubsetInfo(size=len(indices), total=len(all_categories), seed=seed, stratified_by=field,
                      hash=digest)
    return PreparedTask(name=name, task=task, doc_indices=indices, categories=[all_categories[i] for i in indices],
                        subset=info, primary_metric=metric, higher_is_better=higher)


def load_tasks(names: Sequence[str], *, subset_size: int | None = None, seed: int = 0,
               include_paths: Sequence[str | Path] = (),
               exclude: Mapping[str, Sequence[int]] | None = None) -> list[PreparedTask]:
    """Load each named task (a group expands to its tasks) and cut its subset of `subset_size` documents (never
    the ones `exclude` lists for that task)."""
    lmms_eval = import_lmms_eval("tasks")
    manager = task_manager_for(names, include_paths)
    task_dict = lmms_eval.tasks.get_task_dict(list(names), manager)
    exclude = exclude or {}
    prepared = [prepare_task(name, task, subset_size=subset_size, seed=seed, exclude=exclude.get(name, ()))
                for name, task in _leaf_tasks(task_dict)]
    for item in prepared:
        item.manager = manager
    if not prepared:
        raise TaskNotFoundError(f"tasks {list(names)} expanded to no evaluable task")
    return prepared


def category_counts(prepared: PreparedTask) -> dict[str, int]:
    """Documents per category in the subset (for reports)."""
    return dict(Counter(str(c) for c in prepared.categories))
