"""Prefill benchmark of the pruning hooks: overhead, selection cost and speed-up against the token-count bound.

A Llama-shaped text model (hidden 1024, 8 layers by default, fp32, random weights) reads a LLaVA-1.5-like
prompt: 576 vision placeholders between 6 and 34 text tokens. Prefill is `model(ids, use_cache=True,
logits_to_keep=1)`, what `generate` runs first. The bound for a prune before layer K of L keeping P of N
tokens is L*N / (K*N + (L-K)*P): the speed-up if time were proportional to tokens per layer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuner.config import PruningConfig
from tuner.latency import measure_interleaved
from tuner.pruning import apply_pruning
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.dart import dart_select

VISION_TOKEN_ID = 31999
N_VISION = 576
TEXT_BEFORE, TEXT_AFTER = 6, 34


@dataclass(frozen=True)
class BenchRow:
    """One configuration's prefill numbers."""

    name: str
    kept_vision: int
    tokens_after_k: int
    median_ms: float
    iqr_ms: float
    speedup: float
    bound: float

    @property
    def fraction_of_bound(self) -> float:
        return self.speedup / self.bound


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


def run_benchmark(*, layer: int = 2, budgets: tuple[int, ...] = (64, 128, 192),
                  methods: tuple[str, ...] = ("dart", "random", "fastv"), repeats: int = 7, warmup: int = 2,
                  hidden: int = 1024, layers: int = 8, attn_implementation: str = "sdpa"
                  ) -> tuple[list[BenchRow], dict[str, float]]:
    """Interleaved prefill timings of every configuration, and DART's selection cost on its own."""
    model = build_model(hidden=hidden, layers=layers, attn_implementation=attn_implementation)
    ids = build_prompt()
    n_tokens = ids.shape[1]

    def prefill() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    configs: dict[str, tuple[PruningConfig | None, int]] = {"no hooks": (None, N_VISION),
                                                            "keep_all": (PruningConfig("keep_all", layer), N_VISION)}
    for method in methods:
        for budget in budgets:
            configs[f"{method} {budget}"] = (PruningConfig(method, layer, budget=budget), budget)

    def setup(cfg: PruningConfig | None):
        return None if cfg is None else (lambda: apply_pruning(model, cfg, vision_token_ids=[VISION_TOKEN_ID]))

    timings = measure_interleaved(prefill, {name: setup(cfg) for name, (cfg, _) in configs.items()},
                                  repeats=repeats, warmup=warmup)
    base = timings["no hooks"].median_ms
    rows = []
    for name, (_, kept) in configs.items():
        after_k = n_tokens - N_VISION + kept
        bound = layers * n_tokens / (layer * n_tokens + (layers - layer) * after_k)
        timing = timings[name]
        rows.append(BenchRow(name, kept, after_k, timing.median_ms, timing.iqr_ms, base / timing.median_ms, bound))

    selection = _dart_selection_ms(model, ids, layer, budgets, repeats)
    return rows, selection


def _dart_selection_ms(model: LlamaForCausalLM, ids: torch.Tensor, layer: int, budgets: tuple[int, ...],
                       repeats: int) -> dict[str, float]:
    """Median ms of DART's selection alone (final norm + dart_select) on states captured from a prefill."""
    text_model = model.get_decoder()
    seen = {}
    capture = AttentionCapture(text_model.layers[layer - 1].self_attn, keys=True, last_row_attention=False)
    hook = text_model.layers[layer].register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        keys = capture.take_keys()
    finally:
        hook.remove()
        capture.remove()
    vision = ids == VISION_TOKEN_ID

    def select(budget: int):
        def run() -> None:
            with torch.no_grad():
                dart_select(text_model.norm(seen["h"]), keys, vision, budget=budget)
        return run

    out = {}
    for budget in budgets:
        timing = measure_interleaved(select(budget), {"dart": None}, repeats=max(repeats, 10), warmup=2)
        out[f"dart {budget}"] = timing["dart"].median_ms
    return out


def hook_selection_ms(methods: Sequence[str | tuple[str, dict[str, Any]]] = ("dart", "divprune", "cdpruner"), *,
                      layer: int = 2, budgets: tuple[int, ...] = (64, 128, 192), repeats: int = 7, warmup: int = 2,
                      hidden: int = 1024, layers: int = 8, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Selection ms per prefill as the hooks record it (`RequestStats.select_ms`): median and minimum over `repeats`
    prefills of each method (a name, or a name and its options) at each budget, on this benchmark's model and
    prompt (576 vision tokens). The minimum is the cost on an otherwise idle core; the median includes contention."""
    model = build_model(hidden=hidden, layers=layers).to(device)
    ids = build_prompt().to(device)
    out = {}
    for spec in methods:
        method, options = (spec, {}) if isinstance(spec, str) else spec
        label = method + "".join(f" {key}={value}" for key, value in options.items())
        for budget in budgets:
            cfg = PruningConfig(method, layer, budget=budget, options=options)
            with apply_pruning(model, cfg, vision_token_ids=[VISION_TOKEN_ID]) as handle, torch.no_grad():
                for _ in range(warmup + repeats):
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times = [r.select_ms for r in handle.requests[warmup:]]
            out[f"{label} {budget}"] = {"median": statistics.median(times), "min": min(times)}
    return out


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    """Plain rows for JSON output."""
    return [asdict(row) | {"fraction_of_bound": row.fraction_of_bound} for row in rows]
