"""`PruningConfig`: one validated pruning configuration (method, layer K, how many vision tokens to keep).

A configuration is a schedule of stages: its own fields are the first stage, and `stages` holds the later ones
(PyramidDrop's shape), each pruning at a deeper layer among the vision tokens the stage before it kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from tuner.config.catalog import method_class


@dataclass(frozen=True)
class Stage:
    """A later pruning stage: at decoder layer `layer`, keep a share (`keep_ratio`) or a count (`budget`) of the
    vision tokens the previous stage kept, chosen by `method` (None: the first stage's method and options, with
    `options` overriding them key by key)."""

    layer: int
    keep_ratio: float | None = None
    budget: int | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data without the unset fields; `Stage(**d)` reverses it."""
        return {key: value for key, value in asdict(self).items()
                if key == "layer" or (value is not None and value != {})}


STAGE_KEYS = tuple(f.name for f in fields(Stage))  # what a stage's plain-data form may hold


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and how much; validated on construction so a bad value fails before any compute.

    `layer` is K: layers 0..K-1 see every token, layers K.. only the kept ones. K = 0 prunes before the language
    model, on the input embeddings, so only methods that read no layer K-1 keys or attention can run there. Give either
    `keep_ratio` (fraction of each row's vision tokens, in (0, 1]) or `budget` (vision tokens per row);
    `keep_all` needs neither. `options` are the method's own settings (DART's pivots, FastV's alpha, ...): the
    names and values its `option_specs` declare; construction checks them and fills in every default, so
    `config.options` always holds all of the method's options.
    `require_vision=False` lets prompts without any vision token pass through unpruned.
    `processor` holds the processor's own settings that set how many vision tokens an image becomes before any
    pruning (`max_pixels`, `image_size`, ...: `tuner.models.processor_budget`, checked against the model's family
    when it is loaded); `method="keep_all"` with them is plain downsampling.
    `stages` are later stages at strictly increasing layers above K; a stage's `keep_ratio` is a share of the
    vision tokens the previous stage kept. The seed is shared by every stage; a stage without a method of its
    own inherits this configuration's options (see `stage_config`).
    Configurations stored before options held DART's pivots (schema 1) are read by `tuner.config.schema`.
    """

    method: str = "dart"
    layer: int = 2
    keep_ratio: float | None = None
    budget: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    require_vision: bool = True
    stages: tuple[Stage, ...] = ()
    processor: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method_cls = method_class(self.method)
        _check_int("layer", self.layer, low=0)
        if self.keep_ratio is not None and self.budget is not None:
            raise ValueError(f"give keep_ratio or budget, not both (got keep_ratio={self.keep_ratio}, "
                             f"budget={self.budget})")
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                    or not math.isfinite(self.keep_ratio) or not 0.0 < self.keep_ratio <= 1.0:
                raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
            object.__setattr__(self, "keep_ratio", float(self.keep_ratio))
        if self.budget is not None:
            _check_int("budget", self.budget, low=1)
        _check_int("seed", self.seed, low=0)
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of {self.method} options, got {type(self.options).__name__}")
        object.__setattr__(self, "options", method_cls.resolve_options(dict(self.options)))
        method_cls.validate(self)
        if self.layer == 0 and method_cls.reads_previous_layer(self):
            raise ValueError(f"method {self.method!r} reads layer K-1's keys or attention, which do not exist before "
                             "the language model: use layer >= 1 with it, or a method that reads the embeddings at K=0")
        object.__setattr__(self, "stages", _as_stages(self.stages))
        object.__setattr__(self, "processor", as_processor_settings(self.processor))
        previous = self.layer
        for index, stage in enumerate(self.stages):
            if isinstance(stage.layer, bool) or not isinstance(stage.layer, int) or stage.layer <= previous:
                raise ValueError(f"stages[{index}].layer must be an int above the previous stage's layer {previous}, "
                                 f"got {stage.layer!r}")
            previous = stage.layer
            try:
                self.stage_config(index + 1)
            except ValueError as error:
                raise ValueError(f"stages[{index}]: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML / JSON / Optuna attributes); `PruningConfig(**d)` reverses it.

        A one-stage configuration has no `stages` key and one at the default processor no `processor` key, so they
        read exactly as before schedules and processor settings existed.
        """
        data = asdict(self)
        data.pop("stages")
        if self.stages:
            data["stages"] = [stage.to_dict() for stage in self.stages]
        if not self.processor:
            data.pop("processor")
        return data

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer of every stage, first to last."""
        return (self.layer, *(stage.layer for stage in self.stages))

    def stage_config(self, index: int) -> PruningConfig:
        """Stage `index` (0: this configuration's own fields) as a one-stage configuration, which its method runs."""
        if index == 0:
            return replace(self, stages=()) if self.stages else self
        stage = self.stages[index - 1]
        options = {**self.options, **stage.options} if stage.method is None else stage.options
        return replace(self, method=stage.method or self.method, layer=stage.layer, keep_ratio=stage.keep_ratio,
                       budget=stage.budget, options=options, stages=())

    def stage_configs(self) -> tuple[PruningConfig, ...]:
        """Every stage as a one-stage configuration, first to last."""
        return tuple(self.stage_config(index) for index in range(len(self.stages) + 1))

    def budget_for(self, n_vision: int) -> int:
        """Vision tokens to keep in a row with `n_vision` of them: round(keep_ratio * n), at least 1."""
        if self.budget is not None:
            return min(self.budget, n_vision)
        if self.keep_ratio is None:
            return n_vision
        return min(n_vision, max(1, round(self.keep_ratio * n_vision)))


def schedule_text(config: PruningConfig, exact: bool = True) -> str:
    """A compact description of every stage, e.g. 'fastv@2:0.5>4:0.5>6:0.5' (a budget reads '64t').

    A stage names its method only when it differs from the stage before it. `parse_schedule` reads it back;
    `exact=False` rounds shares to 3 significant digits for tables (a sampler's 0.25002262102234907 reads 0.25).
    """
    parts, previous = [], None
    for stage in config.stage_configs():
        amount = _amount_text(stage.keep_ratio, stage.budget) if exact or stage.keep_ratio is None \
            else f"{stage.keep_ratio:.3g}"
        parts.append(f"{stage.method + '@' if stage.method != previous else ''}{stage.layer}:{amount}")
        previous = stage.method
    return ">".join(parts)


def options_text(config: PruningConfig) -> str:
    """The options worth a one-line description, 'n_image_pivots=4 n_text_pivots=4': those a search draws by
    default (their spec has a `search` range) or set away from their default; a schedule lists each stage's
    distinct text once ('' when there is nothing to show)."""
    texts = []
    for stage in config.stage_configs():
        specs = method_class(stage.method).option_specs
        text = " ".join(f"{name}={_value_text(value)}" for name, value in stage.options.items()
                        if specs[name].search is not None or value != specs[name].default)
        if text and text not in texts:
            texts.append(text)
    return "; ".join(texts)


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else "null" if value is None else str(value)


def methods_text(config: PruningConfig) -> str:
    """The methods of a configuration's stages, in order without repeats: 'dart', or 'random>dart' for a stack."""
    return ">".join(dict.fromkeys(stage.method for stage in config.stage_configs()))


def stack(before: PruningConfig, after: PruningConfig) -> PruningConfig:
    """One schedule: every stage of `before`, then every stage of `after` (e.g. a K = 0 stage under an in-LM one).

    `after`'s amounts stay shares (or counts) of what the stage before them kept; its stages name their methods
    and options explicitly, so none inherits `before`'s. The seed is `after`'s.
    """
    if after.layer <= before.layers[-1]:
        raise ValueError(f"cannot stack a schedule starting at layer {after.layer} after one ending at layer "
                         f"{before.layers[-1]}: stage layers must increase")
    tail = tuple(Stage(layer=c.layer, keep_ratio=c.keep_ratio, budget=c.budget, method=c.method, options=c.options)
                 for c in after.stage_configs())
    return replace(before, seed=after.seed, stages=(*before.stages, *tail))


def parse_schedule(text: str, **fields: Any) -> PruningConfig:
    """The configuration `schedule_text` wrote as `text`; `fields` sets the rest (seed, the first stage's options, ...).

    The exact inverse of `schedule_text` on configurations whose later stages name a method only when it is
    not the first stage's (a stage running the first stage's method gets `method=None`, so it shares that
    stage's options). Bad text is a one-line ValueError naming the stage at fault.
    """
    taken = sorted(set(fields) & {"method", "layer", "keep_ratio", "budget", "stages"})
    if taken:
        raise ValueError(f"the schedule sets {taken} itself; give only the other PruningConfig fields")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a schedule must be text like 'fastv@2:0.5>4:64t', got {text!r}")
    stages, previous = [], None
    for index, part in enumerate(text.strip().split(">")):
        method, layer, amount = _parse_stage(part.strip(), index, text)
        previous = method or previous
        stages.append((previous, layer, amount))
    first_method, first_layer, (keep_ratio, budget) = stages[0]
    later = tuple(Stage(layer, ratio, count, None if method == first_method else method)
                  for method, layer, (ratio, count) in stages[1:])
    try:
        return PruningConfig(method=first_method, layer=first_layer, keep_ratio=keep_ratio, budget=budget,
                             stages=later, **fields)
    except ValueError as error:
        raise ValueError(f"schedule {text!r}: {error}") from None


def _amount_text(keep_ratio: float | None, budget: int | None) -> str:
    """'0.5' for a share (exact: the shortest text that reads back as the same float), '64t' for a budget."""
    if keep_ratio is not None:
        short = f"{keep_ratio:g}"
        return short if float(short) == keep_ratio else repr(keep_ratio)
    return f"{budget}t" if budget is not None else "all"


def _parse_stage(part: str, index: int, text: str) -> tuple[str | None, int, tuple[float | None, int | None]]:
    """(method or None, layer, (keep_ratio, budget)) of one '[method@]layer:amount' part of schedule `text`."""
    where = f"schedule {text!r}, stage {index + 1} {part!r}"
    method, at, rest = part.rpartition("@")
    layer_text, colon, amount = rest.partition(":")
    if not colon:
        raise ValueError(f"{where} must read [method@]layer:amount, e.g. 'fastv@2:0.5' or '4:64t'")
    if at and not method:
        raise ValueError(f"{where} has '@' without a method name before it")
    if index == 0 and not at:
        raise ValueError(f"{where}: the first stage must name its method, e.g. 'dart@{layer_text}:{amount}'")
    if at:
        try:
            method_class(method)
        except ValueError as error:  # names the known methods
            raise ValueError(f"{where}: {error}") from None
    if not (layer_text.isascii() and layer_text.isdigit()):
        raise ValueError(f"{where}: layer {layer_text!r} is not a whole number")
    return method or None, int(layer_text), _parse_amount(amount, where)


def _parse_amount(amount: str, where: str) -> tuple[float | None, int | None]:
    """(keep_ratio, budget) from '0.5', '64t' or 'all'."""
    if amount == "all":
        return None, None
    if amount.endswith("t") and amount[:-1].isascii() and amount[:-1].isdigit():
        return None, int(amount[:-1])
    try:
        ratio = float(amount)
    except ValueError:
        ratio = math.nan
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{where}: amount {amount!r} is not a share in (0, 1], a token count like '64t', or 'all'")
    return ratio, None


def as_pruning_config(value: Any) -> PruningConfig:
    """`value` itself when it is a PruningConfig, or the one it holds as `.config` (a preset); TypeError otherwise."""
    config = value if isinstance(value, PruningConfig) else getattr(value, "config", None)
    if not isinstance(config, PruningConfig):
        raise TypeError(f"expected a PruningConfig or a preset, got {type(value).__name__}")
    return config


def check_layer(layer: int, n_layers: int) -> None:
    """Raise a ValueError unless K = `layer` is a decoder layer a pruning stage can start at (0..n_layers - 1)."""
    if not 0 <= layer <= n_layers - 1:
        raise ValueError(f"layer K={layer} is out of range: the model has {n_layers} decoder layers, so K must be "
                         f"in 0..{n_layers - 1}")


def check_layers(config: PruningConfig, n_layers: int) -> None:
    """`check_layer` for every stage of `config`; the message names the stage that is out of range."""
    for index, layer in enumerate(config.layers):
        try:
            check_layer(layer, n_layers)
        except ValueError as error:
            raise ValueError(f"{'layer' if index == 0 else f'stages[{index - 1}]'}: {error}") from None


def processor_text(config: PruningConfig) -> str:
    """'image_size=96' (settings joined by ', '): the processor settings of a configuration, '' when none."""
    return ", ".join(f"{name}={value}" for name, value in config.processor.items())


def as_processor_settings(settings: Any) -> dict[str, int]:
    """Processor settings as a dict sorted by name; one-line errors for what cannot be a setting (whether the
    family has it is checked when the model is loaded)."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"processor must be a mapping of processor settings, got {type(settings).__name__}")
    for name, value in settings.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"processor setting names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"processor.{name} must be a positive integer, got {value!r}")
    return dict(sorted(settings.items()))


def _as_stages(stages: Any) -> tuple[Stage, ...]:
    """`stages` as a tuple of Stage, from Stage objects or their plain-data form; one-line errors otherwise."""
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, (list, tuple)):
        raise ValueError(f"stages must be a list of stages, got {type(stages).__name__}")
    out = []
    for index, stage in enumerate(stages):
        if isinstance(stage, Mapping):
            unknown = sorted(set(stage) - set(STAGE_KEYS))
            if unknown or "layer" not in stage:
                raise ValueError(f"stages[{index}] needs a layer and takes only {list(STAGE_KEYS)}, got "
                                 f"{sorted(stage)}")
            stage = Stage(**stage)
        if not isinstance(stage, Stage):
            raise ValueError(f"stages[{index}] must be a Stage or a mapping, got {type(stage).__name__}")
        if not isinstance(stage.options, dict):
            raise ValueError(f"stages[{index}].options must be a dict, got {type(stage.options).__name__}")
        out.append(stage)
    return tuple(out)


def _check_int(name: str, value: Any, *, low: int) -> None:
    """Raise a ValueError naming `name` unless it is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
