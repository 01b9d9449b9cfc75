"""`PruningConfig`: one validated pruning configuration (method, layer K, how many vision tokens to keep)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.method_catalog import method_class

PIVOT_ORDERS = ("reference", "rank", "position")  # how DART visits its pivots (DART.md §3)


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and how much; validated on construction so a bad value fails before any compute.

    `layer` is K: layers 0..K-1 see every token, layers K.. only the kept ones (K >= 1). Give either
    `keep_ratio` (fraction of each row's vision tokens, in (0, 1]) or `budget` (vision tokens per row);
    `keep_all` needs neither. `options` holds method-specific settings, checked by the method itself.
    `require_vision=False` lets prompts without any vision token pass through unpruned.
    """

    method: str = "dart"
    layer: int = 2
    keep_ratio: float | None = None
    budget: int | None = None
    n_image_pivots: int = 4
    n_text_pivots: int = 4
    pivot_order: str = "reference"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    require_vision: bool = True

    def __post_init__(self) -> None:
        method_cls = method_class(self.method)
        _check_int("layer", self.layer, low=1)
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
        _check_int("n_image_pivots", self.n_image_pivots, low=0)
        _check_int("n_text_pivots", self.n_text_pivots, low=0)
        if self.n_image_pivots + self.n_text_pivots < 1:
            raise ValueError("n_image_pivots + n_text_pivots must be >= 1")
        if self.pivot_order not in PIVOT_ORDERS:
            raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {self.pivot_order!r}")
        _check_int("seed", self.seed, low=0)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))
        method_cls.validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML / JSON / Optuna attributes); `PruningConfig(**d)` reverses it."""
        return asdict(self)

    def budget_for(self, n_vision: int) -> int:
        """Vision tokens to keep in a row with `n_vision` of them: round(keep_ratio * n), at least 1."""
        if self.budget is not None:
            return min(self.budget, n_vision)
        if self.keep_ratio is None:
            return n_vision
        return min(n_vision, max(1, round(self.keep_ratio * n_vision)))


def as_pruning_config(value: Any) -> PruningConfig:
    """`value` itself when it is a PruningConfig, or the one it holds as `.config` (a preset); TypeError otherwise."""
    config = value if isinstance(value, PruningConfig) else getattr(value, "config", None)
    if not isinstance(config, PruningConfig):
        raise TypeError(f"expected a PruningConfig or a preset, got {type(value).__name__}")
    return config


def check_layer(layer: int, n_layers: int) -> None:
    """Raise a ValueError unless K = `layer` is a decoder layer a pruning stage can start at (1..n_layers - 1)."""
    if not 1 <= layer <= n_layers - 1:
        raise ValueError(f"layer K={layer} is out of range: the model has {n_layers} decoder layers, so K must be "
                         f"in 1..{n_layers - 1}")


def _check_int(name: str, value: Any, *, low: int) -> None:
    """Raise a ValueError naming `name` unless it is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
