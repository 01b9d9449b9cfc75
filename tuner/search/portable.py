"""`tune --portable vllm|sglang`: a search space restricted to what a serving engine runs (`tuner.config.ports`).

The engines run no pruning, so the restricted space searches `keep_all` only, at one layer, over the processor
settings the engine takes; the rest of the space (model, tasks, constraints, sampler, workload) is kept. A space
left with nothing to search fails in one line before anything is loaded; once the model is loaded, its family's
settings are checked again (`check_family`). A new study records its target (`tuner.results.ports.TARGET_ATTR`).
"""

from __future__ import annotations

import dataclasses

import optuna

from tuner.config.ports import PortError, check_target, engine_settings, portable_processor_settings
from tuner.results.ports import TARGET_ATTR
from tuner.results.record import PROVENANCE_ATTR
from tuner.search.params import IntParam, SpaceError
from tuner.search.processor_space import ProcessorSpec
from tuner.search.space import SearchSpace

__all__ = ["check_family", "portable_space", "record_target"]


def portable_space(space: SearchSpace, target: str) -> SearchSpace:
    """`space` restricted to what `target` runs: `keep_all` at the space's lowest layer, over the processor
    settings the target takes for some family; SpaceError in one line when nothing is left to search."""
    try:
        check_target(target)
    except PortError as error:
        raise SpaceError(f"--portable: {error}") from None
    if target == "transformers":
        return space
    takes = portable_processor_settings(target)
    searched = dict(space.processor.settings) if space.processor is not None else {}
    kept = {name: param for name, param in searched.items() if name in takes}
    if not kept:
        dropped = f"its processor section has only {', '.join(sorted(searched))}" if searched else \
            "it has no processor section"
        raise SpaceError(f"{space.source}: --portable {target}: nothing to search: {target} runs no pruning, only "
                         f"processor settings it takes ({', '.join(sorted(takes))}), and {dropped}")
    return dataclasses.replace(space, methods=("keep_all",), layer=IntParam(values=(min(space.layer.choices()),)),
                               options={}, keep_ratio=None, budget=None, schedule=None, before_lm=None,
                               processor=ProcessorSpec(kept))


def check_family(space: SearchSpace, target: str, family: str) -> None:
    """Every processor setting of a restricted space is one `target` takes for the loaded model's `family`:
    SpaceError naming the first that is not (before any trial)."""
    if target == "transformers" or space.processor is None:
        return
    takes = portable_processor_settings(target, family)
    for name in space.processor.settings:
        if name not in takes:
            fact = engine_settings(target, family).get(name)
            why = getattr(fact, "reason", f"{target} takes no such setting for family {family}")
            raise SpaceError(f"{space.source}: --portable {target}: processor.{name} does not port: {why}")


def record_target(study: optuna.Study, target: str) -> None:
    """Store a new study's target (`transformers` is the default and is not stored). A resumed study keeps the
    one it has: a search other than the one it was tuned with is already refused (`tuner.search.space_changes`),
    and the same search under another name changes nothing it stores."""
    if PROVENANCE_ATTR not in study.user_attrs and target != "transformers":
        study.set_user_attr(TARGET_ATTR, target)
