"""Search spaces: a YAML file validated into a typed `SearchSpace` that suggests `PruningConfig`s to Optuna trials.

Every error names the file, the key and what is allowed, so a typo in a space fails before a model is loaded.
A parameter is either a range (`{low: 1, high: 4}`, floats may add `log: true`) or a list of values.
`options` holds each method's own parameters (`options: {dart: {n_image_pivots: {low: 1, high: 8}}}`; a list
of option names, or null for one, takes the range the method declares); Optuna draws them as `<method>.<option>`,
only in that method's trials. The method `pdrop` is a shape, not a method: PyramidDrop-style schedules, FastV at
every layer of `schedule`.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from tuner.config import PruningConfig
from tuner.config.catalog import method_class
from tuner.config.options import param_name
from tuner.config.schema import LEGACY_METHOD, LEGACY_PARAMS
from tuner.config.workload import WORKLOAD_KEYS, Workload, WorkloadError, workload_from_dict
from tuner.config.yaml_files import read_yaml
from tuner.measure.early_stop import EarlyStopping
from tuner.models.attention import ATTN_IMPLEMENTATIONS
from tuner.models.feature_cache import DEFAULT_FEATURE_CACHE_MB
from tuner.models.loading import DTYPES
from tuner.pruning.registry import available_methods
from tuner.search.early_stopping import parse_early_stopping
from tuner.search.params import (
    NO_STAGE,
    PDROP,
    BeforeLMSpec,
    FloatParam,
    IntParam,
    OptionParam,
    Reader,
    ScheduleSpec,
    SpaceError,
    options_grid,
    parse_before_lm,
    parse_option_section,
    parse_schedule,
    refuses_layer_0,
    suggest_options,
)
from tuner.search.processor_space import ProcessorSpec, parse_processor
from tuner.search.space_files import resolve_space

# The samplers a space may name, each an Optuna class (`tuner.search.study.make_sampler` builds them).
SAMPLER_CLASSES: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler, "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler, "grid": optuna.samplers.GridSampler}
SAMPLERS = tuple(SAMPLER_CLASSES)
LEGACY_OPTION_KEYS = tuple(LEGACY_PARAMS)  # top-level keys of spaces written before `options`
_TOP_LEVEL = {"study", "model", "tasks", "include_paths", "subset", "methods", "layer", "options", "keep_ratio",
              "budget", "attn_implementation", "dtype", "device", "batch_size", "constraints", "sampler", "trials",
              "timeout_s", "latency", "max_failures", "feature_cache_mb", "early_stopping", "schedule", "before_lm",
              "processor", *LEGACY_OPTION_KEYS}
MAX_OPTION_CHECKS = 256  # option combinations a space check tries per method (every listed value / range end)


@dataclass(frozen=True)
class Constraints:
    """Feasibility: accuracy floors (absolute, or a fraction of the unpruned baseline) and a prefill ceiling."""

    min_accuracy: float | None = None
    min_relative_accuracy: float | None = None
    max_prefill_ms: float | None = None

    def accuracy_floor(self, baseline_accuracy: Callable[[], float]) -> float | None:
        """The lowest accuracy allowed: the higher of the absolute and relative floors (None without either).
        `baseline_accuracy` is called only when a relative floor needs it."""
        floors = [self.min_accuracy] if self.min_accuracy is not None else []
        if self.min_relative_accuracy is not None:
            floors.append(self.min_relative_accuracy * baseline_accuracy())
        return max(floors, default=None)


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)


LatencySpec = Workload  # the space's `latency` section: timing protocol and serving workload


@dataclass(frozen=True)
class SearchSpace:
    """What to tune (model, tasks, subset), over which parameters, under which constraints, for how long."""

    study: str
    model: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    layer: IntParam
    options: dict[str, dict[str, OptionParam]] = field(default_factory=dict)  # method -> option -> its range
    keep_ratio: FloatParam | None = None
    budget: IntParam | None = None
    include_paths: tuple[str, ...] = ()
    subset_size: int | None = None
    subset_seed: int = 0
    attn_implementation: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    max_failures: int = 0
    feature_cache_mb: int = DEFAULT_FEATURE_CACHE_MB  # image features kept across trials (MiB of host memory; 0 = off)
    constraints: Constraints = Constraints()
    sampler: SamplerSpec = SamplerSpec()
    trials: int | None = 20
    timeout_s: float | None = None
    latency: LatencySpec = LatencySpec()
    early_stopping: EarlyStopping | None = None  # score in chunks, stopping hopeless trials (None: off)
    source: str | None = None
    schedule: ScheduleSpec | None = None
    before_lm: BeforeLMSpec | None = None  # an optional K = 0 stage stacked under each trial's configuration
    processor: ProcessorSpec | None = None  # the processor's own vision-token settings, searched with pruning

    def suggest(self, trial: Any) -> PruningConfig:
        """The configuration for one trial. A method's options are only suggested for that method's trials, a
        schedule's parameters for `pdrop` trials and a before-LM stage's share when it has a method (conditional
        parameters), except under the grid sampler, which needs every parameter in every trial."""
        config = self._suggest_in_lm(trial)
        if self.before_lm is not None:
            config = self.before_lm.suggest(trial, config, grid=self.sampler.name == "grid")
        return config if self.processor is None else self.processor.suggest(trial, config)

    def _suggest_in_lm(self, trial: Any) -> PruningConfig:
        """The in-LM part of a trial's configuration: a method at layer K, or a `pdrop` schedule."""
        method = trial.suggest_categorical("method", list(self.methods))
        grid = self.sampler.name == "grid"
        if self.schedule is not None and (method == PDROP or grid):
            schedule = self.schedule.suggest(trial)
            if method == PDROP:
                return schedule
        layer = self.layer.suggest(trial, "layer")
        amount: dict[str, Any] = {}
        if method != "keep_all":
            if self.keep_ratio is not None:
                amount["keep_ratio"] = self.keep_ratio.suggest(trial, "keep_ratio")
            else:
                amount["budget"] = self.budget.suggest(trial, "budget")
        options = suggest_options(trial, self.options, method, grid)
        return PruningConfig(method=method, layer=layer, **amount, options=options)

    def grid(self) -> dict[str, list]:
        """The full grid for Optuna's GridSampler (every parameter must be a list or an integer range)."""
        if set(self.methods) == {PDROP}:
            grid = {"method": [PDROP], **self.schedule.grid(self.source)}
            grid |= self.before_lm.grid(self.source) if self.before_lm is not None else {}
            return grid | (self.processor.grid(self.source) if self.processor is not None else {})
        grid: dict[str, list] = {"method": list(self.methods), "layer": self.layer.choices()}
        grid.update(options_grid(self.options, f"{self.source}: options"))
        if self.keep_ratio is not None:
            if self.keep_ratio.values is None:
                raise SpaceError(f"{self.source}: keep_ratio: the grid sampler needs a list of values, "
                                 f"not a range")
            grid["keep_ratio"] = list(self.keep_ratio.values)
        elif self.budget is not None:
            grid["budget"] = self.budget.choices()
        if self.schedule is not None:
            grid.update(self.schedule.grid(self.source))
        if self.before_lm is not None:
            grid.update(self.before_lm.grid(self.source))
        return grid | (self.processor.grid(self.source) if self.processor is not None else {})

    def max_layer(self) -> int:
        """The deepest layer a trial can prune at (a schedule's last stage included)."""
        return max([max(self.layer.choices()), *([self.schedule.max_layer()] if self.schedule else [])])

    def paper_defaults(self) -> list[dict[str, Any]]:
        """The published setting (`PruningMethod.paper_setting`, e.g. DART's K=2 with 4+4 pivots) of every method
        of the space that declares one and that the space contains, as trial params; the amount is the space's
        value nearest the paper's. An option the space does not search must keep the paper's value by default.
        With `before_lm`, the setting runs without a stage before the language model (so that must be allowed)."""
        if self.before_lm is not None and NO_STAGE not in self.before_lm.methods:
            return []
        found = []
        for method in self.methods:
            setting = None if method == PDROP else method_class(method).paper_setting
            if setting is None or not self.layer.contains(setting.layer):
                continue
            searched = self.options.get(method, {})
            defaults = method_class(method).option_defaults
            if not all(searched[name].contains(value) if name in searched else defaults.get(name) == value
                       for name, value in setting.options.items()):
                continue
            params: dict[str, Any] = {"method": method, "layer": setting.layer}
            if self.keep_ratio is not None:
                choices = self.keep_ratio.values or (max(self.keep_ratio.low,
                                                         min(self.keep_ratio.high, setting.keep_ratio)),)
                params["keep_ratio"] = min(choices, key=lambda v: abs(v - setting.keep_ratio))
            elif self.budget is not None:
                params["budget"] = min(self.budget.choices(), key=lambda v: abs(v - setting.budget))
            params.update({param_name(method, name): value for name, value in setting.options.items()
                           if name in searched})
            if self.before_lm is not None:
                params["before_lm_method"] = NO_STAGE
            found.append(params)
        return found

    def option_values(self, method: str, name: str) -> list[Any]:
        """What option `name` of `method` can be in this space: its listed values or range ends, or its default."""
        param = self.options.get(method, {}).get(name)
        return param.extremes() if param is not None else [method_class(method).option_defaults[name]]

    def with_overrides(self, **overrides: Any) -> SearchSpace:
        """A copy with command-line overrides (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_workload(self, **overrides: Any) -> SearchSpace:
        """A copy whose `latency` workload takes the given values (`tune --objective ...`; None values ignored);
        SpaceError naming a bad one."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return dataclasses.replace(self, latency=dataclasses.replace(self.latency, **given))
        except WorkloadError as error:
            raise SpaceError(f"{self.source}: {error}") from None

    def with_sampler(self, name: str) -> SearchSpace:
        """A copy that uses another sampler (`--sampler`): same seed, and the space's sampler options only when
        the name is the same. SpaceError for an unknown name, or a space the grid sampler cannot enumerate."""
        if name not in SAMPLERS:
            raise SpaceError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
        options = self.sampler.options if name == self.sampler.name else {}
        space = dataclasses.replace(self, sampler=SamplerSpec(name, self.sampler.seed, options))
        if name == "grid":
            space.grid()  # a range that cannot be gridded fails here, naming the parameter
        return space


def parse_space(data: Any, source: str = "<search space>") -> SearchSpace:
    """Validate plain data (a parsed YAML document) into a SearchSpace."""
    r = Reader(source)
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: must be a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise SpaceError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL)}")
    for key in ("model", "tasks", "methods"):
        if key not in data:
            raise r.fail(key, "is required")
    if not isinstance(data["model"], str) or not data["model"]:
        raise r.fail("model", f"must be a hub id or a folder path, got {data['model']!r}")
    tasks = data["tasks"] if isinstance(data["tasks"], list) else [data["tasks"]]
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise r.fail("tasks", f"must be a task name or a list of task names, got {data['tasks']!r}")
    methods = data["methods"] if isinstance(data["methods"], list) else [data["methods"]]
    if not methods:
        raise r.fail("methods", "the list is empty")
    for i, method in enumerate(methods):
        r.choice(f"methods[{i}]", method, (*available_methods(), PDROP))
    if (PDROP in methods) != ("schedule" in data):
        raise r.fail("schedule", f"is needed exactly when methods lists {PDROP}")
    schedule = parse_schedule(r, data["schedule"]) if "schedule" in data else None
    if "layer" not in data and any(m != PDROP for m in methods):
        raise r.fail("layer", "is required")
    # A pdrop-only space draws no `layer`; its first stage layer stands in where a layer bound is checked.
    layer = r.int_param("layer", data["layer"], low=0) if "layer" in data else schedule.layers[0]
    before_lm = parse_before_lm(r, data["before_lm"]) if "before_lm" in data else None
    if 0 in layer.choices():
        if before_lm is not None:
            raise r.fail("layer", "may not include 0 with before_lm: that stage is layer 0 (raise layer.low to 1)")
        if refusing := [m for m in methods if m != PDROP and refuses_layer_0(m)]:
            raise r.fail("layer", f"includes 0, where {', '.join(refusing)} cannot run (no layer K-1 keys or "
                                  "attention exist before the language model); raise layer.low to 1")
    method_options = _parse_options(r, data, methods)
    if ("keep_ratio" in data) == ("budget" in data) and any(m not in ("keep_all", PDROP) for m in methods):
        raise r.fail("keep_ratio", "give exactly one of keep_ratio and budget")
    keep_ratio = r.float_param("keep_ratio", data["keep_ratio"]) if "keep_ratio" in data else None
    budget = r.int_param("budget", data["budget"], low=1) if "budget" in data else None
    subset = r.mapping("subset", data.get("subset"), {"size", "seed"})
    size = subset.get("size")
    if size is not None:
        r.number("subset.size", size, integer=True, low=1)
    if "seed" in subset:
        r.number("subset.seed", subset["seed"], integer=True, low=0)
    if "study" in data and (not isinstance(data["study"], str) or not data["study"].strip()):
        raise r.fail("study", f"must be a study name (a non-empty string), got {data['study']!r}")
    constraints = r.mapping("constraints", data.get("constraints"),
                            {f.name for f in dataclasses.fields(Constraints)})
    if "min_accuracy" in constraints:
        r.number("constraints.min_accuracy", constraints["min_accuracy"], integer=False)
    if "min_relative_accuracy" in constraints:
        r.number("constraints.min_relative_accuracy", constraints["min_relative_accuracy"], integer=False, low=0,
                 high=1.5)
    if "max_prefill_ms" in constraints:
        r.number("constraints.max_prefill_ms", constraints["max_prefill_ms"], integer=False, low=0, low_open=True)
    sampler = r.mapping("sampler", data.get("sampler"), {"name", "seed", "options"})
    sampler_name = r.choice("sampler.name", sampler.get("name", "tpe"), SAMPLERS)
    if sampler.get("seed") is not None:
        r.number("sampler.seed", sampler["seed"], integer=True, low=0)
    options = sampler.get("options") or {}
    if not isinstance(options, dict):
        raise r.fail("sampler.options", f"must be a mapping of sampler keyword arguments, got {options!r}")
    try:
        latency = workload_from_dict(r.mapping("latency", data.get("latency"), set(WORKLOAD_KEYS)))
    except WorkloadError as error:
        raise SpaceError(f"{source}: {error}") from None
    early = parse_early_stopping(r, data.get("early_stopping"))
    trials = data.get("trials", 20)
    if trials is not None:
        r.number("trials", trials, integer=True, low=1)
    timeout = data.get("timeout_s")
    if timeout is not None:
        r.number("timeout_s", timeout, integer=False, low=0, low_open=True)
    for key in ("batch_size",):
        if key in data:
            r.number(key, data[key], integer=True, low=1)
    if "max_failures" in data:
        r.number("max_failures", data["max_failures"], integer=True, low=0)
    if "feature_cache_mb" in data:
        r.number("feature_cache_mb", data["feature_cache_mb"], integer=True, low=0)
    include = data.get("include_paths") or []
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise r.fail("include_paths", f"must be a list of folders, got {include!r}")
    base = Path(source).parent if source and not source.startswith("<") else Path(".")
    model = data["model"]
    if model.startswith("./") or model.startswith("../"):
        model = str((base / model).resolve())  # relative to the space file, like lmms-eval's data_files
    space = SearchSpace(
        study=str(data.get("study") or Path(source).stem), model=model, tasks=tuple(tasks), methods=tuple(methods),
        layer=layer, options=method_options, keep_ratio=keep_ratio, budget=budget,
        include_paths=tuple(str((base / p).resolve()) if not Path(p).is_absolute() else p for p in include),
        subset_size=size, subset_seed=int(subset.get("seed", 0)),
        attn_implementation=r.choice("attn_implementation", data.get("attn_implementation", "auto"),
                                     ATTN_IMPLEMENTATIONS),
        dtype=r.choice("dtype", data.get("dtype", "auto"), ("auto", *DTYPES)), device=str(data.get("device", "auto")),
        batch_size=int(data.get("batch_size", 1)), max_failures=int(data.get("max_failures", 0)),
        feature_cache_mb=int(data.get("feature_cache_mb", DEFAULT_FEATURE_CACHE_MB)),
        constraints=Constraints(**constraints), sampler=SamplerSpec(sampler_name, sampler.get("seed", 0), options),
        trials=trials, timeout_s=timeout, latency=latency, early_stopping=early,
        source=source, schedule=schedule, before_lm=before_lm,
        processor=parse_processor(r, data["processor"]) if "processor" in data else None)
    _check_option_combinations(r, space)
    if sampler_name == "grid":
        space.grid()  # fails now, naming the parameter, if a range cannot be gridded
    return space


def _parse_options(r: Reader, data: dict[str, Any], methods: list[str]) -> dict[str, dict[str, OptionParam]]:
    """The `options` section: per listed method, its searched options (a mapping of ranges, or a list of names
    taking the method's default ranges). Spaces from before `options` wrote DART's pivot counts at the top level;
    they are read into `options.dart`, with a FutureWarning."""
    section = data.get("options")
    if section is not None and not isinstance(section, dict):
        raise r.fail("options", f"must be a mapping of method name -> its options, got {type(section).__name__}")
    section = dict(section or {})
    legacy = {key: data[key] for key in LEGACY_OPTION_KEYS if key in data}
    if legacy:
        warnings.warn(f"{r.source}: top-level {', '.join(legacy)} are deprecated; write them under "
                      f"options: {{{LEGACY_METHOD}: ...}}", FutureWarning, stacklevel=4)
        if LEGACY_METHOD in methods:
            own = section.get(LEGACY_METHOD) or {}
            if isinstance(own, list):
                own = dict.fromkeys(own)
            if not isinstance(own, dict):
                raise r.fail(f"options.{LEGACY_METHOD}", f"must be a mapping or a list of option names, got {own!r}")
            clash = sorted(set(legacy) & set(own))
            if clash:
                raise r.fail(clash[0], f"is given both at the top level and under options.{LEGACY_METHOD}")
            section[LEGACY_METHOD] = {**legacy, **own}
    return parse_option_section(r, "options", section, [m for m in methods if m != PDROP])


def _check_option_combinations(r: Reader, space: SearchSpace) -> None:
    """Build each method's configuration at every combination of its options' listed values and range ends, so a
    space whose options cannot go together (DART with 0 + 0 pivots) fails before any trial."""
    amount: dict[str, Any] = {}
    if space.keep_ratio is not None:
        amount["keep_ratio"] = (space.keep_ratio.values or (space.keep_ratio.low,))[0]
    elif space.budget is not None:
        amount["budget"] = space.budget.choices()[0]
    for method, params in space.options.items():
        names = list(params)
        combinations = itertools.islice(itertools.product(*(params[n].extremes() for n in names)), MAX_OPTION_CHECKS)
        for values in combinations:
            options = dict(zip(names, values))
            try:
                PruningConfig(method=method, layer=min(space.layer.choices()),
                              **({} if method == "keep_all" else amount), options=options)
            except ValueError as error:
                raise r.fail(f"options.{method}", f"the space allows {options}, which is not a valid {method} "
                                                  f"configuration: {error}") from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space: a YAML file, or the name of a packaged one (`dart-tuner spaces`)."""
    path = resolve_space(path)
    return parse_space(read_yaml(path, kind="search space", error=SpaceError), str(path))
