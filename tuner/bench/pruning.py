"""Prefill benchmark of the pruning hooks: overhead, selection cost and speed-up against the token-count bound.

A text stack with random weights (`tuner.bench.shapes`: by default `small`, a Llama-shaped hidden 1024 x 8
layers; or a real 7B model's) reads its shape's prompt: the vision placeholders between text tokens. Prefill is
`model(ids, use_cache=True, logits_to_keep=1)`, what `generate` runs first, on the chosen device and dtype; on
CUDA every timing is synchronised. The bound for a prune before layer K of L keeping P of N tokens is
L*N / (K*N + (L-K)*P): the speed-up if time were proportional to tokens per layer.

The model is no VLM family, so `apply_pruning(..., vision_token_ids=[shape.vision_token_id])` binds the plain-LM
family: the placeholder id marks the vision tokens, and the one contiguous run reads as a single square image
grid when its length is a square (`grids_from_runs`), which is what window_fastv and avgpool lay their windows
over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from tuner.bench.shapes import BenchShape, build_prompt, build_text_stack, get_shape, resolve_device, resolve_dtype
from tuner.config import PruningConfig, check_layer
from tuner.measure.latency import Timing, measure_interleaved
from tuner.pruning import PruningHandle, RequestStats, apply_pruning, available_methods, get_method_class
from tuner.results.tables import Column, Sheet

DEFAULT_BUDGETS = get_shape("small").budgets()  # 64, 128, 192 of 576


@dataclass(frozen=True)
class BenchRow:
    """One configuration's prefill numbers; the selection columns are None for the run without hooks."""

    name: str
    method: str | None  # None: no hooks
    budget: int | None  # the requested budget; None for no hooks and keep_all
    kept_vision: int  # what the hooks report the method kept (avgpool keeps a square grid, not the budget)
    tokens_after_k: int
    median_ms: float
    iqr_ms: float
    speedup: float
    bound: float
    select_ms: float | None  # median over the timed rounds of the selection inside each prefill
    select_iqr_ms: float | None
    device: str = "cpu"
    dtype: str = "float32"
    shape: str = "small"

    @property
    def fraction_of_bound(self) -> float:
        return self.speedup / self.bound

    @property
    def select_share(self) -> float | None:
        """The selection's share of this row's own (pruned) prefill."""
        return None if self.select_ms is None else self.select_ms / self.median_ms


@dataclass(frozen=True)
class BenchResult:
    """Every timed row, and the configurations that could not run on the bench model with the reason why."""

    rows: list[BenchRow]
    skipped: dict[str, str]


def default_methods() -> tuple[str, ...]:
    """Every registered method but keep_all, which is a row of its own, and those that rank by a vision tower's
    attention (`visionzip`): the bench model is a plain language model without one."""
    return tuple(name for name in available_methods()
                 if name != "keep_all" and not get_method_class(name).needs.vision_saliency)


def run_benchmark(*, layer: int = 2, budgets: Sequence[int] | None = None, methods: Sequence[str] | None = None,
                  repeats: int = 7, warmup: int = 2, hidden: int | None = None, layers: int | None = None,
                  attn_implementation: str = "sdpa", shape: str = "small", device: str = "cpu",
                  dtype: str = "float32") -> BenchResult:
    """Interleaved prefill timings of no hooks, keep_all and every method x budget, with each selection's cost.

    The selection cost is what the hooks time inside each timed prefill (`RequestStats.select_ms`), so it is
    the same measurement for every method. Each configuration first runs one untimed prefill; one that fails
    there (a method needing options or a model family) is left out and reported in `skipped`. `budgets` None:
    the shape's own (1/9, 2/9 and 3/9 of its vision tokens); `hidden` and `layers` None: the shape's sizes.
    """
    bench_shape, torch_device, torch_dtype = get_shape(shape), resolve_device(device), resolve_dtype(dtype)
    budgets = bench_shape.budgets() if budgets is None else budgets
    layers = layers or bench_shape.layers
    methods = default_methods() if methods is None else tuple(dict.fromkeys(m for m in methods if m != "keep_all"))
    for name in methods:
        get_method_class(name)  # an unknown name is the user's error, not a skip
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budgets must be ints >= 1, got {budget!r}")
    check_layer(layer, layers)
    model = build_text_stack(bench_shape, device=torch_device, dtype=torch_dtype,
                             attn_implementation=attn_implementation, hidden=hidden, layers=layers)
    ids = build_prompt(bench_shape, torch_device)
    vision_ids = [bench_shape.vision_token_id]

    def prefill() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    configs: dict[str, PruningConfig | None] = {"no hooks": None, "keep_all": PruningConfig("keep_all", layer)}
    skipped: dict[str, str] = {}
    for method in methods:
        for budget in dict.fromkeys(budgets):
            name = f"{method} {budget}"
            try:
                configs[name] = PruningConfig(method, layer, budget=budget)
                _prefill_once(model, configs[name], prefill, vision_ids)
            except Exception as error:  # noqa: BLE001 - any failure of a method on this model is reported, not raised
                configs.pop(name, None)
                skipped[name] = f"{type(error).__name__}: {' '.join(str(error).split())}"

    handles: dict[str, list[PruningHandle]] = {name: [] for name in configs}

    def setup(name: str, cfg: PruningConfig | None):
        if cfg is None:
            return None

        def attach() -> PruningHandle:
            handles[name].append(apply_pruning(model, cfg, vision_token_ids=vision_ids))
            return handles[name][-1]
        return attach

    timings = measure_interleaved(prefill, {name: setup(name, cfg) for name, cfg in configs.items()},
                                  repeats=repeats, warmup=warmup, device=torch_device)
    base = timings["no hooks"].median_ms
    rows = []
    for name, cfg in configs.items():
        # Every configuration is entered once per round, so its first `warmup` handles are the warm-up rounds'.
        requests = [request for handle in handles[name][warmup:] for request in handle.requests]
        if cfg is not None and len(requests) != repeats:
            raise RuntimeError(f"{name}: {len(requests)} pruned prefills recorded in {repeats} timed rounds")
        rows.append(_row(name, cfg, timings[name], base, requests, layer=layer, layers=layers, shape=bench_shape,
                         device=str(torch_device), dtype=dtype))
    return BenchResult(rows, skipped)


def _row(name: str, config: PruningConfig | None, timing: Timing, base_ms: float, requests: list[RequestStats], *,
         layer: int, layers: int, shape: BenchShape, device: str, dtype: str) -> BenchRow:
    """One row from its prefill timing and the hooks' record of its timed prefills (none without hooks)."""
    n_tokens = shape.n_tokens
    kept = requests[-1].n_kept_vision[0] if requests else shape.n_vision
    select = Timing(tuple(request.select_ms for request in requests)) if requests else None
    after_k = n_tokens - shape.n_vision + kept
    bound = layers * n_tokens / (layer * n_tokens + (layers - layer) * after_k)
    return BenchRow(name, None if config is None else config.method, None if config is None else config.budget,
                    kept, after_k, timing.median_ms, timing.iqr_ms, base_ms / timing.median_ms, bound,
                    None if select is None else select.median_ms, None if select is None else select.iqr_ms,
                    device, dtype, shape.name)


def _prefill_once(model: torch.nn.Module, config: PruningConfig, prefill: Callable[[], None],
                  vision_ids: list[int]) -> None:
    """One untimed prefill under `config`: whatever fails on this model fails here, before the timing."""
    with apply_pruning(model, config, vision_token_ids=vision_ids):
        prefill()


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    """Plain rows for JSON output."""
    return [asdict(row) | {"fraction_of_bound": row.fraction_of_bound, "select_share": row.select_share}
            for row in rows]


BENCH_COLUMNS = (Column("config", "config", "config", "left"), Column("kept", "kept", "kept"),
                 Column("tokens_after_k", "tokens after K"), Column("prefill_ms", "prefill ms (IQR)", "prefill ms"),
                 Column("speedup", "speed-up", "speed-up"), Column("bound", "bound"),
                 Column("of_bound", "of bound", "of bound"), Column("select_ms", "select ms (IQR)", "select ms (IQR)"),
                 Column("select_share", "select % of prefill"))


def bench_sheet(result: BenchResult, *, hidden: int | None, layers: int | None, threads: int, layer: int,
                repeats: int, attn_implementation: str, shape: str = "small", device: str = "cpu",
                dtype: str = "float32") -> Sheet:
    """The benchmark's rows as a table: prefill, speed-up against its token-count bound and the selection's cost."""
    bench_shape = get_shape(shape)
    where = f"{threads} threads" if device == "cpu" else device
    sheet = Sheet(f"Prefill, {shape}: {bench_shape.about}; hidden {hidden or bench_shape.hidden} x "
                  f"{layers or bench_shape.layers} layers, {dtype}, {where}, {attn_implementation}; "
                  f"{bench_shape.n_vision} vision + {bench_shape.n_tokens - bench_shape.n_vision} text tokens, "
                  f"K={layer}; medians of {repeats} interleaved rounds", BENCH_COLUMNS)
    for row in result.rows:
        select = "-" if row.select_ms is None else f"{row.select_ms:.2f} ({row.select_iqr_ms:.2f})"
        share = "-" if row.select_share is None else f"{100 * row.select_share:.2f}%"
        prefill = f"{row.median_ms:.1f} ({row.iqr_ms:.1f})"
        sheet.add_row([row.name, str(row.kept_vision), str(row.tokens_after_k), prefill, f"{row.speedup:.2f}x",
                       f"{row.bound:.2f}x", f"{100 * row.fraction_of_bound:.0f}%", select, share],
                      {"name": row.name, "median_ms": row.median_ms, "speedup": row.speedup})
    return sheet
