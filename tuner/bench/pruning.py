"""Prefill benchmark of the pruning hooks: overhead, selection cost and speed-up against the token-count bound.

A Llama-shaped text model (hidden 1024, 8 layers by default, fp32, random weights) reads a LLaVA-1.5-like
prompt: 576 vision placeholders between 6 and 34 text tokens. Prefill is `model(ids, use_cache=True,
logits_to_keep=1)`, what `generate` runs first. The bound for a prune before layer K of L keeping P of N
tokens is L*N / (K*N + (L-K)*P): the speed-up if time were proportional to tokens per layer.

The model is no VLM family, so `apply_pruning(..., vision_token_ids=[VISION_TOKEN_ID])` binds the plain-LM
family: the placeholder id marks the vision tokens, and the one contiguous run of 576 reads as a single 24 x 24
image grid (`grids_from_runs`), which is what window_fastv and avgpool lay their windows over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuner.config import PruningConfig, check_layer
from tuner.measure.latency import Timing, measure_interleaved
from tuner.pruning import PruningHandle, RequestStats, apply_pruning, available_methods, get_method_class
from tuner.results.tables import Column, Sheet

VISION_TOKEN_ID = 31999
N_VISION = 576
TEXT_BEFORE, TEXT_AFTER = 6, 34
DEFAULT_BUDGETS = (64, 128, 192)


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


def build_model(*, hidden: int = 1024, layers: int = 8, attn_implementation: str = "sdpa",
                seed: int = 0) -> LlamaForCausalLM:
    """A random-weight Llama with LLaVA-1.5-7B's proportions at a CPU-friendly size."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                         max_position_embeddings=4096, pad_token_id=0, attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def build_prompt(seed: int = 0) -> torch.Tensor:
    """[1, 616]: text, 576 vision placeholders, text (the question after the image)."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(10, 30000, (TEXT_BEFORE,), generator=generator)
    after = torch.randint(10, 30000, (TEXT_AFTER,), generator=generator)
    return torch.cat([before, torch.full((N_VISION,), VISION_TOKEN_ID), after])[None]


def default_methods() -> tuple[str, ...]:
    """Every registered method but keep_all, which is a row of its own, and those that rank by a vision tower's
    attention (`visionzip`): the bench model is a plain language model without one."""
    return tuple(name for name in available_methods()
                 if name != "keep_all" and not get_method_class(name).needs.vision_saliency)


def run_benchmark(*, layer: int = 2, budgets: Sequence[int] = DEFAULT_BUDGETS, methods: Sequence[str] | None = None,
                  repeats: int = 7, warmup: int = 2, hidden: int = 1024, layers: int = 8,
                  attn_implementation: str = "sdpa") -> BenchResult:
    """Interleaved prefill timings of no hooks, keep_all and every method x budget, with each selection's cost.

    The selection cost is what the hooks time inside each timed prefill (`RequestStats.select_ms`), so it is
    the same measurement for every method. Each configuration first runs one untimed prefill; one that fails
    there (a method needing options or a model family) is left out and reported in `skipped`.
    """
    methods = default_methods() if methods is None else tuple(dict.fromkeys(m for m in methods if m != "keep_all"))
    for name in methods:
        get_method_class(name)  # an unknown name is the user's error, not a skip
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budgets must be ints >= 1, got {budget!r}")
    check_layer(layer, layers)
    model = build_model(hidden=hidden, layers=layers, attn_implementation=attn_implementation)
    ids = build_prompt()

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
                _prefill_once(model, configs[name], prefill)
            except Exception as error:  # noqa: BLE001 - any failure of a method on this model is reported, not raised
                configs.pop(name, None)
                skipped[name] = f"{type(error).__name__}: {' '.join(str(error).split())}"

    handles: dict[str, list[PruningHandle]] = {name: [] for name in configs}

    def setup(name: str, cfg: PruningConfig | None):
        if cfg is None:
            return None

        def attach() -> PruningHandle:
            handles[name].append(apply_pruning(model, cfg, vision_token_ids=[VISION_TOKEN_ID]))
            return handles[name][-1]
        return attach

    timings = measure_interleaved(prefill, {name: setup(name, cfg) for name, cfg in configs.items()},
                                  repeats=repeats, warmup=warmup)
    base = timings["no hooks"].median_ms
    rows = []
    for name, cfg in configs.items():
        # Every configuration is entered once per round, so its first `warmup` handles are the warm-up rounds'.
        requests = [request for handle in handles[name][warmup:] for request in handle.requests]
        if cfg is not None and len(requests) != repeats:
            raise RuntimeError(f"{name}: {len(requests)} pruned prefills recorded in {repeats} timed rounds")
        rows.append(_row(name, cfg, timings[name], base, requests, layer=layer, layers=layers))
    return BenchResult(rows, skipped)


def _row(name: str, config: PruningConfig | None, timing: Timing, base_ms: float, requests: list[RequestStats], *,
         layer: int, layers: int) -> BenchRow:
    """One row from its prefill timing and the hooks' record of its timed prefills (none without hooks)."""
    n_tokens = N_VISION + TEXT_BEFORE + TEXT_AFTER
    kept = requests[-1].n_kept_vision[0] if requests else N_VISION
    select = Timing(tuple(request.select_ms for request in requests)) if requests else None
    after_k = n_tokens - N_VISION + kept
    bound = layers * n_tokens / (layer * n_tokens + (layers - layer) * after_k)
    return BenchRow(name, None if config is None else config.method, None if config is None else config.budget,
                    kept, after_k, timing.median_ms, timing.iqr_ms, base_ms / timing.median_ms, bound,
                    None if select is None else select.median_ms, None if select is None else select.iqr_ms)


def _prefill_once(model: LlamaForCausalLM, config: PruningConfig, prefill: Callable[[], None]) -> None:
    """One untimed prefill under `config`: whatever fails on this model fails here, before the timing."""
    with apply_pruning(model, config, vision_token_ids=[VISION_TOKEN_ID]):
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


def bench_sheet(result: BenchResult, *, hidden: int, layers: int, threads: int, layer: int, repeats: int,
                attn_implementation: str) -> Sheet:
    """The benchmark's rows as a table: prefill, speed-up against its token-count bound and the selection's cost."""
    n_tokens = N_VISION + TEXT_BEFORE + TEXT_AFTER
    sheet = Sheet(f"Prefill, Llama-shaped hidden {hidden} x {layers} layers, fp32, {threads} threads, "
                  f"{attn_implementation}; {N_VISION} vision + {n_tokens - N_VISION} text tokens, K={layer}; "
                  f"medians of {repeats} interleaved rounds", BENCH_COLUMNS)
    for row in result.rows:
        select = "-" if row.select_ms is None else f"{row.select_ms:.2f} ({row.select_iqr_ms:.2f})"
        share = "-" if row.select_share is None else f"{100 * row.select_share:.2f}%"
        prefill = f"{row.median_ms:.1f} ({row.iqr_ms:.1f})"
        sheet.add_row([row.name, str(row.kept_vision), str(row.tokens_after_k), prefill, f"{row.speedup:.2f}x",
                       f"{row.bound:.2f}x", f"{100 * row.fraction_of_bound:.0f}%", select, share],
                      {"name": row.name, "median_ms": row.median_ms, "speedup": row.speedup})
    return sheet
