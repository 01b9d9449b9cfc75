"""One configuration (or several) next to the unpruned baseline: accuracy, kept tokens, latency, FLOPs, KV bytes.

Accuracy comes from `Evaluator`; latency from the protocol in `tuner.measure.latency`, on fixed inputs (the first
documents of the first task's subset) with every configuration interleaved with the baseline in one run; FLOPs
and KV bytes from `tuner.models.cost` for those same inputs and the kept-token counts the hooks reported on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from transformers import BatchFeature

from tuner.config import PruningConfig, check_layers
from tuner.config.workload import Workload
from tuner.evaluation.inputs import as_images, build_inputs
from tuner.evaluation.runner import EvalResult, Evaluator
from tuner.evaluation.tasks import PreparedTask, TaskFailed
from tuner.measure.latency import GenerationTiming
from tuner.models.cost import kv_cache_bytes, prefill_flops
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import processor_settings
from tuner.pruning import apply_pruning

BASELINE = "unpruned"


@dataclass(frozen=True)
class CostOnInputs:
    """Token counts and analytic cost of one configuration on the latency inputs (summed over the batch).

    `n_kept_vision` is what the last stage kept, `stage_kept_vision` what each stage kept (one entry per stage).
    """

    n_tokens: int
    n_vision: int
    n_kept_vision: int
    prefill_flops: int
    kv_cache_bytes: int
    stage_kept_vision: tuple[int, ...] = ()
    select_ms: float | None = None  # measured, not analytic: the median selection time over the timed prefills


@dataclass
class ConfigReport:
    """Everything measured for one configuration."""

    name: str
    config: PruningConfig | None
    accuracy: EvalResult | None
    latency: GenerationTiming
    cost: CostOnInputs

    def to_dict(self, *, with_samples: bool = False) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict() if self.config else None,
                "accuracy": self.accuracy.to_dict(with_samples=with_samples) if self.accuracy else None,
                "latency": self.latency.to_dict(), "cost": self.cost.__dict__.copy()}


def latency_inputs(loaded: LoadedModel, task: PreparedTask, n_docs: int = 1, *, repeat: bool = False) -> BatchFeature:
    """The fixed inputs every configuration is timed on: the first `n_docs` documents of the task's subset (with
    `repeat`, the subset again from its start past its end: a batch larger than the subset, for memory probes)."""
    docs = task.task.eval_docs
    if len(docs) < n_docs and not (repeat and len(docs)):
        raise ValueError(f"task {task.name} has {len(docs)} documents in its subset, fewer than {n_docs}")
    texts, images = [], []
    for position in (index % len(docs) for index in range(n_docs)):
        doc = docs[position]
        try:
            text, visuals = task.task.doc_to_text(doc), task.task.doc_to_visual(doc)
        except Exception as error:  # noqa: BLE001 - the task's own code: its failure, named, not our bug
            raise TaskFailed(f"task {task.name}, doc {position} of the latency inputs: its doc_to_text or "
                             f"doc_to_visual raised {type(error).__name__}: {error}") from error
        texts.append(text)
        images.append(as_images(visuals, f"task {task.name}, doc {position}"))
    return build_inputs(loaded, texts, images)


class InputsUnderSettings:
    """The latency documents (the task's first `single_docs`, and its first `batch_size`) processed under a
    configuration's processor settings, once per distinct setting (`measure_workload`'s `inputs_of`)."""

    def __init__(self, loaded: LoadedModel, task: PreparedTask, batch_size: int, *, single_docs: int = 1) -> None:
        self.loaded, self.task, self.batch_size, self.single_docs = loaded, task, batch_size, single_docs
        self._cache: dict[tuple, tuple[BatchFeature, BatchFeature | None]] = {}

    def __call__(self, config: PruningConfig) -> tuple[BatchFeature, BatchFeature | None]:
        key = tuple(config.processor.items())
        if key not in self._cache:
            with processor_settings(self.loaded, config.processor):
                single = latency_inputs(self.loaded, self.task, self.single_docs)
                batch = latency_inputs(self.loaded, self.task, self.batch_size) if self.batch_size > 1 else None
            self._cache[key] = single, batch
        return self._cache[key]


def vision_counts(loaded: LoadedModel, inputs: BatchFeature) -> list[int]:
    """Vision tokens in each row of processed inputs (padding excluded)."""
    return loaded.adapter.vision_mask(inputs["input_ids"], inputs["attention_mask"]).sum(1).tolist()


def cost_on_inputs(loaded: LoadedModel, inputs: BatchFeature, config: PruningConfig | None,
          stage_kept: list[list[int]], decoded: int = 0) -> CostOnInputs:
    """FLOPs and KV bytes per row, with layers in [K_i, K_{i+1}) seeing what stage i kept (`stage_kept[i][row]`);
    the KV bytes include `decoded` tokens appended to every row after the prefill (FLOPs are the prefill's)."""
    dims = loaded.adapter.spec.text_dims(loaded.model.config)
    mask = inputs["attention_mask"].bool()
    layers = list(config.layers) if config else [0]
    flops = kv = n_tokens = n_vision = 0
    for row, row_vision in enumerate(vision_counts(loaded, inputs)):
        n_row = int(mask[row].sum())
        kept_tokens = [n_row - row_vision + kept[row] for kept in stage_kept]
        flops += prefill_flops(dims, n_row, kept_tokens, layers)
        kv += kv_cache_bytes(dims, n_row + decoded, [kept + decoded for kept in kept_tokens], layers, loaded.dtype)
        n_tokens += n_row
        n_vision += row_vision
    return CostOnInputs(n_tokens=n_tokens, n_vision=n_vision, n_kept_vision=sum(stage_kept[-1]), prefill_flops=flops,
                        kv_cache_bytes=kv, stage_kept_vision=tuple(sum(kept) for kept in stage_kept))


class _RecordingSetup:
    """A setup factory for the latency protocol that applies `config` and keeps the last handle's counts."""

    def __init__(self, model: Any, config: PruningConfig | None) -> None:
        self.model, self.config = model, config
        self.kept: list[list[int]] | None = None  # per stage, per row, of the first request of a run
        self.last_kept: list[list[int]] | None = None  # the same for the run's last request (a workload's batch)
        self.select_ms: list[float] = []  # the selection time of every prefill run under this setup

    def __call__(self) -> AbstractContextManager:
        if self.config is None:
            return nullcontext()
        return _Recorder(self)


class _Recorder:
    def __init__(self, setup: _RecordingSetup) -> None:
        self.setup = setup

    def __enter__(self) -> None:
        self.handle = apply_pruning(self.setup.model, self.setup.config)

    def __exit__(self, *exc: object) -> None:
        if self.handle.requests:
            self.setup.kept = [list(kept) for kept in self.handle.requests[0].stage_kept_vision]
            self.setup.last_kept = [list(kept) for kept in self.handle.requests[-1].stage_kept_vision]
            self.setup.select_ms.append(self.handle.requests[0].select_ms)
        self.handle.remove()


def measure_latency(loaded: LoadedModel, inputs: BatchFeature, configs: Mapping[str, PruningConfig | None], *,
                    new_tokens: int = 8, repeats: int = 5, warmup: int = 1,
                    inputs_of: Callable[[PruningConfig], tuple[BatchFeature, None]] | None = None
                    ) -> dict[str, tuple[GenerationTiming, CostOnInputs]]:
    """Interleaved prefill/decode timing of every configuration on the same documents (`inputs`, or processed under
    a configuration's processor settings by `inputs_of`), with its analytic cost: a workload of one request."""
    from tuner.measure.workload import measure_workload  # it builds on this module's setups and costs

    workload = Workload(new_tokens=new_tokens, repeats=repeats, warmup=warmup)
    measured = measure_workload(loaded, inputs, None, configs, workload, inputs_of=inputs_of)
    return {name: (result.single, result.cost) for name, result in measured.items()}


def compare_configs(loaded: LoadedModel, tasks: list[PreparedTask], configs: Mapping[str, PruningConfig | None], *,
                    batch_size: int = 1, max_failures: int = 0, new_tokens: int = 8, repeats: int = 5,
                    warmup: int = 1, latency_docs: int = 1, skip_accuracy: bool = False,
                    on_progress: Callable[[str, int], None] | None = None) -> list[ConfigReport]:
    """Accuracy of each configuration, then one interleaved latency run of all of them; the baseline comes first.

    `on_progress(stage, n)` is told about answered requests (stage = configuration name) and latency rounds.
    """
    ordered: dict[str, PruningConfig | None] = {BASELINE: None}
    ordered.update({name: config for name, config in configs.items() if name != BASELINE})
    for config in ordered.values():  # before any evaluation, not when the hooks meet it
        if config is not None:
            check_layers(config, len(loaded.adapter.layers))
    evaluator = Evaluator(loaded, tasks, batch_size=batch_size, max_failures=max_failures)
    accuracy: dict[str, EvalResult | None] = {}
    for name, config in ordered.items():
        if skip_accuracy:
            accuracy[name] = None
            continue
        callback = (lambda n, stage=name: on_progress(stage, n)) if on_progress else None
        accuracy[name] = evaluator.evaluate(config, on_progress=callback)
    if on_progress:
        on_progress("latency", 0)
    inputs = latency_inputs(loaded, tasks[0], latency_docs)
    measured = measure_latency(loaded, inputs, ordered, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                               inputs_of=InputsUnderSettings(loaded, tasks[0], 1, single_docs=latency_docs))
    return [ConfigReport(name=name, config=config, accuracy=accuracy[name], latency=measured[name][0],
                         cost=measured[name][1]) for name, config in ordered.items()]
