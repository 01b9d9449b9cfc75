"""`bench-pruning --profile`: where a pruned prefill's time goes, from `torch.profiler` ranges.

Each configuration's prefill runs under `torch.profiler` with one range per decoder layer (put on here, after the
pruning hooks, so a layer's range holds the layer alone) and the hooks' own ranges (`tuner.pruning.profiling`):
the top-level call (`model_call`), layer K-1's capture (inside that layer's range), the selection, the gathers, the
bookkeeping, the masks and, on every pruned layer, the substituted inputs. Beside each pruned configuration the
unhooked model runs a prompt of its kept length: what layers >= K cost with no pruning mechanics at all. Rounds are
interleaved over the configurations and every number is the median over rounds, in ms per prefill (host wall
time; on CUDA each layer range synchronises the device at both ends).

The split of a row's prefill: layers < K (capture excluded), capture, selection, the hooks' steps outside the
layers, layers >= K, and the rest (embedding, rotary table, final norm, logits). Mechanics = capture + hook steps
+ (layers >= K - the unhooked layers >= K at the kept length): what pruning costs beyond the selection.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from tuner.bench.pruning import default_methods
from tuner.bench.shapes import build_prompt, build_text_stack, get_shape, resolve_device, resolve_dtype
from tuner.config import PruningConfig, check_layer
from tuner.pruning import apply_pruning, get_method_class
from tuner.pruning.profiling import PREFIX
from tuner.results.tables import Column, Sheet

HOOK_STEPS = ("model_call", "gather", "bookkeeping", "masks", "substitute")  # the hooks' ranges outside the layers


@dataclass(frozen=True)
class ProfileRow:
    """One configuration's prefill split, ms per prefill (medians over rounds)."""

    name: str
    tokens_after_k: int
    prefill_ms: float
    before_ms: float  # layers < K, the capture excluded
    capture_ms: float
    select_ms: float
    hooks_ms: float  # the hook steps outside the layers (HOOK_STEPS)
    after_ms: float  # layers >= K
    after_unhooked_ms: float  # layers >= K of the unhooked model on a prompt of the kept length
    rest_ms: float  # embedding, rotary table, final norm, logits: outside every range
    speedup: float  # the no-hooks row's profiled prefill over this one's
    bound: float
    steps_ms: dict[str, float]  # every hook range by name

    @property
    def layer_excess_ms(self) -> float:
        """What layers >= K spend beyond the same layers unhooked at the kept length (substituted inputs)."""
        return self.after_ms - self.after_unhooked_ms

    @property
    def mechanics_ms(self) -> float:
        """Pruning's cost beyond the selection: capture, hook steps and the layers' excess."""
        return self.capture_ms + self.hooks_ms + self.layer_excess_ms

    @property
    def fraction_of_bound(self) -> float:
        return self.speedup / self.bound

    def fraction_without(self, base_ms: float, *, select: bool) -> float:
        """The share of the bound this row would reach without its mechanics (and, `select`, its selection)."""
        saved = self.mechanics_ms + (self.select_ms if select else 0.0)
        return base_ms / (self.prefill_ms - saved) / self.bound


class LayerRanges:
    """A profiler range `dart_tuner::layer<i>` around each decoder layer's forward; `remove()` takes them off."""

    def __init__(self, layers: Sequence[torch.nn.Module], device: torch.device) -> None:
        self._open: dict[int, record_function] = {}
        self._sync = device.type == "cuda"
        self._hooks = []
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(partial(self._enter, index)))
            self._hooks.append(layer.register_forward_hook(partial(self._exit, index)))

    def _enter(self, index: int, module: torch.nn.Module, args: tuple) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._open[index] = record_function(f"{PREFIX}layer{index}").__enter__()

    def _exit(self, index: int, module: torch.nn.Module, args: tuple, output: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._open.pop(index).__exit__(None, None, None)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def profiled_ranges(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> dict[str, float]:
    """ms of every `dart_tuner::` range in one prefill of `ids` under the profiler (`prefill`: the whole call)."""
    ranges = LayerRanges(model.get_decoder().layers, device)
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(f"{PREFIX}prefill"):
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    finally:
        ranges.remove()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith(PREFIX):
            name = event.name.removeprefix(PREFIX)
            totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us() / 1e3
    return totals


def run_profile(*, layer: int = 2, budgets: Sequence[int] | None = None, methods: Sequence[str] | None = None,
                rounds: int = 5, hidden: int | None = None, layers: int | None = None,
                attn_implementation: str = "sdpa", shape: str = "small", device: str = "cpu",
                dtype: str = "float32") -> list[ProfileRow]:
    """The prefill split of no hooks, keep_all and every method x budget, `rounds` interleaved profiled rounds."""
    if rounds < 1:
        raise ValueError(f"profile rounds must be >= 1, got {rounds}")
    bench_shape, torch_device = get_shape(shape), resolve_device(device)
    budgets = bench_shape.budgets() if budgets is None else budgets
    layers = layers or bench_shape.layers
    methods = default_methods() if methods is None else tuple(dict.fromkeys(m for m in methods if m != "keep_all"))
    for name in methods:
        get_method_class(name)
    check_layer(layer, layers)
    model = build_text_stack(bench_shape, device=torch_device, dtype=resolve_dtype(dtype),
                             attn_implementation=attn_implementation, hidden=hidden, layers=layers)
    ids = build_prompt(bench_shape, torch_device)
    vision_ids = [bench_shape.vision_token_id]
    configs: dict[str, PruningConfig | None] = {"no hooks": None, "keep_all": PruningConfig("keep_all", layer)}
    configs |= {f"{m} {b}": PruningConfig(m, layer, budget=b) for m in methods for b in dict.fromkeys(budgets)}

    kept: dict[str, int] = {}
    for name, config in configs.items():  # one untimed prefill each: its kept count, and the warm-up
        if config is None:
            kept[name] = bench_shape.n_vision
            continue
        with apply_pruning(model, config, vision_token_ids=vision_ids) as handle:
            profiled_ranges(model, ids, torch_device)
            kept[name] = handle.requests[-1].n_kept_vision[0]
    short = {n: build_prompt(replace(bench_shape, n_vision=n), torch_device) for n in set(kept.values())}

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in [*configs, *(f"unhooked {n}" for n in short)]}
    runs = [*((name, config, ids) for name, config in configs.items()),
            *((f"unhooked {n}", None, prompt) for n, prompt in short.items())]
    for round_index in range(rounds):  # the order rotates by one per round, as in measure_interleaved
        for name, config, prompt in runs[round_index % len(runs):] + runs[:round_index % len(runs)]:
            if config is None:
                samples[name].append(profiled_ranges(model, prompt, torch_device))
                continue
            with apply_pruning(model, config, vision_token_ids=vision_ids):
                samples[name].append(profiled_ranges(model, prompt, torch_device))

    text = bench_shape.n_tokens - bench_shape.n_vision
    base_ms = _median(samples["no hooks"], "prefill")
    rows = []
    for name in configs:
        after_k = text + kept[name]
        bound = layers * bench_shape.n_tokens / (layer * bench_shape.n_tokens + (layers - layer) * after_k)
        rows.append(_split(name, samples[name], samples[f"unhooked {kept[name]}"], layer=layer, layers=layers,
                           after_k=after_k, base_ms=base_ms, bound=bound))
    return rows


def _median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(sample.get(key, 0.0) for sample in rounds)


def _split(name: str, rounds: list[dict[str, float]], unhooked: list[dict[str, float]], *, layer: int, layers: int,
           after_k: int, base_ms: float, bound: float) -> ProfileRow:
    """One row from its rounds' ranges and the unhooked rounds at its kept length."""
    def per_round(sample: dict[str, float]) -> dict[str, float]:
        before = sum(sample.get(f"layer{i}", 0.0) for i in range(layer))
        after = sum(sample.get(f"layer{i}", 0.0) for i in range(layer, layers))
        steps = {step: value for step, value in sample.items() if not step.startswith("layer") and step != "prefill"}
        hooks = sum(steps.get(step, 0.0) for step in HOOK_STEPS)
        capture, select = steps.get("capture", 0.0), steps.get("select", 0.0)
        return {"prefill": sample["prefill"], "before": before - capture, "capture": capture, "select": select,
                "hooks": hooks, "after": after, "rest": sample["prefill"] - before - after - select - hooks,
                **{f"step {step}": value for step, value in steps.items()}}

    split = [per_round(sample) for sample in rounds]
    unhooked_after = statistics.median(sum(s.get(f"layer{i}", 0.0) for i in range(layer, layers)) for s in unhooked)
    steps = {key.removeprefix("step "): _median(split, key) for key in split[0] if key.startswith("step ")}
    prefill = _median(split, "prefill")
    return ProfileRow(name, after_k, prefill, _median(split, "before"), _median(split, "capture"),
                      _median(split, "select"), _median(split, "hooks"), _median(split, "after"), unhooked_after,
                      _median(split, "rest"), base_ms / prefill, bound, steps)


def profile_dicts(rows: list[ProfileRow]) -> list[dict]:
    """Plain rows for JSON output, with the derived columns."""
    return [asdict(row) | {"layer_excess_ms": row.layer_excess_ms, "mechanics_ms": row.mechanics_ms,
                           "fraction_of_bound": row.fraction_of_bound} for row in rows]


PROFILE_COLUMNS = (Column("config", "config", "config", "left"), Column("prefill", "prefill ms", "prefill"),
                   Column("before", "layers < K", "<K"), Column("capture", "capture"),
                   Column("select", "select", "select"), Column("hooks", "hook steps", "hooks"),
                   Column("after", "layers >= K", ">=K"), Column("unhooked", "unhooked >= K at P", "ideal >=K"),
                   Column("rest", "rest"), Column("mechanics", "mechanics %", "mech %"),
                   Column("of_bound", "of bound", "of bound"),
                   Column("no_mech", "of bound w/o mechanics", "w/o mech"),
                   Column("no_both", "w/o mechanics + select", "w/o both"))


def profile_sheet(rows: list[ProfileRow], *, title: str) -> Sheet:
    """The split as a table: ms per prefill, mechanics' share of the prefill, shares of the bound."""
    sheet = Sheet(title, PROFILE_COLUMNS)
    base_ms = rows[0].prefill_ms / rows[0].speedup  # the no-hooks prefill
    for row in rows:
        sheet.add_row([row.name, f"{row.prefill_ms:.1f}", f"{row.before_ms:.1f}", f"{row.capture_ms:.2f}",
                       f"{row.select_ms:.2f}", f"{row.hooks_ms:.2f}", f"{row.after_ms:.1f}",
                       f"{row.after_unhooked_ms:.1f}", f"{row.rest_ms:.1f}",
                       f"{100 * row.mechanics_ms / row.prefill_ms:.1f}%", f"{100 * row.fraction_of_bound:.0f}%",
                       f"{100 * row.fraction_without(base_ms, select=False):.0f}%",
                       f"{100 * row.fraction_without(base_ms, select=True):.0f}%"],
                      {"name": row.name, "prefill_ms": row.prefill_ms, "mechanics_ms": row.mechanics_ms})
    return sheet
