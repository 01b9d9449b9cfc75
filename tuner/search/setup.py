"""What a worker measures with, built once: the loaded model, the tasks' subsets, the `TrialMeasurer` over them,
checked against the search space, and the provenance a study stores. The study driver (`Tuner`) and a
confirmation (`dart-tuner confirm`) both take one, so confirming a front never builds a driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.config import check_layer
from tuner.config.catalog import method_class
from tuner.evaluation.tasks import PreparedTask, load_tasks
from tuner.measure.trial import TrialMeasurer
from tuner.models.feature_cache import FeatureCache
from tuner.models.loading import LoadedModel, load_model
from tuner.search.params import PDROP
from tuner.search.processor_space import check_processor_space
from tuner.search.provenance import provenance_of
from tuner.search.space import SearchSpace, SpaceError


@dataclass
class MeasuringSetup:
    """A space's model and tasks, loaded, with the measurer every trial of this worker uses."""

    space: SearchSpace
    loaded: LoadedModel
    tasks: list[PreparedTask]
    measurer: TrialMeasurer
    provenance: dict[str, Any]

    @classmethod
    def load(cls, space: SearchSpace, *, loaded: LoadedModel | None = None,
             tasks: list[PreparedTask] | None = None) -> MeasuringSetup:
        """Load `space`'s model and tasks (or take those given) and refuse, in one line, a space the model cannot
        run: a layer past its decoder, budgets or image pivots above the latency prompt's vision tokens."""
        loaded = loaded or load_model(space.model, dtype=space.dtype, device=space.device,
                                      attn_implementation=space.attn_implementation)
        _check_layers(space, len(loaded.adapter.layers))
        if space.processor is not None:  # every searched setting is the family's, with values the model takes
            check_processor_space(space.processor, loaded, space.source)
        tasks = tasks or load_tasks(space.tasks, subset_size=space.subset_size, seed=space.subset_seed,
                                    include_paths=space.include_paths)
        measurer = TrialMeasurer(loaded, tasks, space.latency, batch_size=space.batch_size,
                                 max_failures=space.max_failures, early_stopping=space.early_stopping,
                                 feature_cache=FeatureCache.from_mb(space.feature_cache_mb))
        _check_token_counts(space, *_fewest_vision_tokens(space, measurer), tasks[0].name)
        return cls(space, loaded, tasks, measurer, provenance_of(loaded, tasks, space))


def _check_layers(space: SearchSpace, n_layers: int) -> None:
    try:
        check_layer(space.max_layer(), n_layers)
    except ValueError as error:
        key = "layer" if space.max_layer() == max(space.layer.choices()) else "schedule"
        raise SpaceError(f"{space.source}: {key}: the space allows up to {space.max_layer()}; {error}") from None


def _fewest_vision_tokens(space: SearchSpace, measurer: TrialMeasurer) -> tuple[int, str]:
    """The fewest vision tokens the latency prompt becomes under the space's processor settings (each checked
    value alone; the default processor without a processor section), and the setting that gives them."""
    fewest, under = measurer.latency_vision_tokens(), ""
    for name, param in (space.processor.settings.items() if space.processor is not None else ()):
        for value in param.checked_values():
            n_vision = measurer.latency_vision_tokens({name: value})
            if n_vision < fewest:
                fewest, under = n_vision, f" at processor.{name} {value}"
    return fewest, under


def _check_token_counts(space: SearchSpace, n_vision: int, under: str, task: str) -> None:
    """Refuse a space whose budgets or image pivots exceed the vision tokens of the prompt every trial's latency is
    measured on (at the processor setting giving the fewest): such trials keep every token (or cannot pick their
    pivots)."""
    where = f"the {n_vision} vision tokens of the latency prompt ({task}, first document{under})"
    checks = [("budget", max(space.budget.choices()))] if space.budget is not None else []
    for method in space.methods:  # options bounded by the vision tokens (DART's image pivots)
        specs = {} if method == PDROP else method_class(method).option_specs
        for name, spec in specs.items():
            values = [v for v in space.option_values(method, name) if v is not None]
            if spec.vision_bound and values:
                checks.append((f"options.{method}.{name}", max(values)))
    for key, largest in checks:
        if largest > n_vision:
            raise SpaceError(f"{space.source}: {key}: the space allows up to {largest}, more than {where}")
