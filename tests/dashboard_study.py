"""Small stored studies for the dashboard tests, written through Optuna's public API with the study and trial
attributes `tuner.search.study.Tuner` stores (a real tuning run on a random tiny model gives every trial accuracy 0,
which cannot show a recommendation moving).

Study "dash": baseline 0.80 at 100 ms (64 vision tokens), constraint accuracy >= 90% of the baseline (0.72).
`legacy=True` writes it as dart-tuner did before methods owned their options: schema-1 configuration attributes
(DART's pivots at the top level, for every method) and the pivot parameters named `n_image_pivots`.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tuner.config import PruningConfig
from tuner.config.environment import environment
from tuner.config.schema import config_attrs

METHODS = ("dart", "random", "pooling", "fastv")
VISION = 64
BASE_FLOPS = 170_000_000
BASE_KV = 270_000

# number: (method, K, keep ratio, image pivots, text pivots, accuracy, prefill ms); trial 0 is the baseline.
TRIALS: dict[int, tuple[str, int, float, int | None, int | None, float, float]] = {
    1: ("dart", 2, 0.25, 4, 4, 0.78, 45.0),      # the paper default (enqueued second)
    2: ("random", 2, 0.30, None, None, 0.70, 50.0),   # infeasible (< 0.72)
    3: ("dart", 1, 0.15, 2, 3, 0.74, 32.0),
    4: ("pooling", 3, 0.50, None, None, 0.79, 70.0),
    5: ("fastv", 2, 0.20, None, None, 0.66, 38.0),    # infeasible
    6: ("dart", 2, 0.10, 3, 2, 0.73, 28.0),
    7: ("random", 1, 0.60, None, None, 0.77, 75.0),   # dominated by 4
    8: ("dart", 3, 0.40, 4, 4, 0.785, 58.0),
    9: ("pooling", 2, 0.08, None, None, 0.60, 22.0),  # infeasible
    10: ("dart", 4, 0.35, 6, 1, 0.755, 60.0),         # dominated by 8
    12: ("fastv", 1, 0.50, None, None, 0.75, 52.0),   # dominated by 1
}
FAILED = 11
BASELINE = (0.80, 100.0)
FLOOR = 0.9 * BASELINE[0]


def provenance(task: str = "dart_shapes", device: str = "cpu") -> dict[str, Any]:
    """Study provenance in the shape `tuner.search.provenance.provenance_of` stores."""
    return {"model_id": "embedded:tiny-llava-shapes", "revision": None, "family": "llava", "dtype": "float32",
            "device": device, "attn_implementation": "sdpa",
            "tasks": [{"name": task, "primary_metric": "exact_match", "size": 60, "total": 600, "seed": 0,
                       "stratified_by": "category", "hash": "09a05793efd9936aba276503e2167cc2c58b3e7a5445f47c7cc"}],
            "latency": {"new_tokens": 4, "repeats": 5, "warmup": 1}, "versions": environment()}


def schema_1_config(config: PruningConfig) -> dict[str, Any]:
    """`config` as a schema-1 trial stored it: every field of the old PruningConfig, pivots at the top level."""
    pivots = {key: config.options.get(key, default) for key, default in
              (("n_image_pivots", 4), ("n_text_pivots", 4), ("pivot_order", "reference"))}
    return {"method": config.method, "layer": config.layer, "keep_ratio": config.keep_ratio, "budget": config.budget,
            **pivots, "seed": config.seed, "options": {}, "require_vision": config.require_vision}


def trial_attrs(config: PruningConfig | None, accuracy: float, prefill_ms: float, base_ms: float,
                task: str = "dart_shapes", legacy: bool = False) -> dict[str, Any]:
    """The user attributes a measured trial stores (`TrialMeasurer.measure`; same keys, plausible values)."""
    keep = 1.0 if config is None or config.keep_ratio is None else config.keep_ratio
    kept = float(max(1, round(keep * VISION)))
    flops = int(BASE_FLOPS * (0.2 + 0.8 * keep))
    stored = {"config": schema_1_config(config) if config else None} if legacy else config_attrs(config)
    return {
        **stored,
        "accuracy": accuracy, "metrics": {task: {"exact_match": accuracy}}, "n_samples": 60,
        "accuracy_by_category": {f"{task}/color": accuracy, f"{task}/count": accuracy, f"{task}/shape": accuracy},
        "kept_vision_mean": kept, "kept_vision_min": kept, "kept_vision_max": kept, "vision_mean": float(VISION),
        "keep_ratio_achieved": kept / VISION,
        "prefill_ms": prefill_ms, "prefill_iqr_ms": 0.04 * prefill_ms, "prefill_repeats": 5, "latency_seconds": 0.8,
        "decode_ms_per_token": 12.0, "decode_iqr_ms": 0.3, "end_to_end_ms": prefill_ms + 36.0,
        "peak_memory_bytes": None, "baseline_prefill_ms_same_run": base_ms, "speedup_same_run": base_ms / prefill_ms,
        "speedup_low": 0.95 * base_ms / prefill_ms, "speedup_high": 1.05 * base_ms / prefill_ms, "latency_noisy": False,
        "latency_warning": "",
        "prefill_flops": flops, "kv_cache_bytes": int(BASE_KV * (0.2 + 0.8 * keep)), "flops_ratio": flops / BASE_FLOPS,
        "latency_input_tokens": 130, "latency_input_vision": VISION, "select_ms": 0.2,
        "latency_signature": None if config is None else f"sig-{prefill_ms}", "latency_input_kept_vision": int(kept),
        "samples": [[i, 1.0 if i < accuracy * 10 else 0.0, int(kept)] for i in range(10)],
        "eval_seconds": 3.5,
        **workload_attrs(prefill_ms, base_ms, keep),
    }


def workload_attrs(prefill_ms: float, base_ms: float, keep: float) -> dict[str, Any]:
    """The workload fields of a prefill_ms study at batch 1 and 8 new tokens (`WorkloadResult.record_fields`)."""
    e2e = prefill_ms + 36.0
    return {"objective": "prefill_ms", "workload_batch_size": 1, "workload_new_tokens": 8, "ttft_ms": prefill_ms,
            "ttft_iqr_ms": 0.04 * prefill_ms, "ttft_ms_low": 0.97 * prefill_ms, "ttft_ms_high": 1.03 * prefill_ms,
            "e2e_ms": e2e, "e2e_iqr_ms": 0.04 * e2e, "e2e_ms_low": 0.97 * e2e, "e2e_ms_high": 1.03 * e2e,
            "throughput": 8000.0 / e2e, "throughput_iqr": 0.3, "throughput_low": 7760.0 / e2e,
            "throughput_high": 8240.0 / e2e, "decode_batch_ms_per_token": 12.0, "decode_batch_iqr_ms": 0.3,
            "memory_bytes": int(BASE_KV * (0.2 + 0.8 * keep)), "memory_source": "analytic_kv_cache",
            "baseline_objective_same_run": base_ms}


def distributions(method: str, legacy: bool = False) -> dict[str, optuna.distributions.BaseDistribution]:
    """The distributions `SearchSpace.suggest` gives a trial of `method` in the demo-like space."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        "method": CategoricalDistribution(METHODS), "layer": IntDistribution(1, 4),
        "keep_ratio": FloatDistribution(0.05, 0.6, log=True)}
    if method == "dart":
        prefix = "" if legacy else "dart."
        dists.update({f"{prefix}n_image_pivots": IntDistribution(1, 8),
                      f"{prefix}n_text_pivots": IntDistribution(0, 8)})
    return dists


def build_study(storage: str, name: str = "dash", *, task: str = "dart_shapes", device: str = "cpu",
                scale_ms: float = 1.0, trials: dict | None = None, with_baseline: bool = True,
                legacy: bool = False) -> optuna.Study:
    """A finished dart-tuner study: baseline, pruned trials (some infeasible, some dominated) and a failed one."""
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    study.set_user_attr("provenance", provenance(task, device))
    study.set_user_attr("objectives", ["accuracy", "prefill_ms"])
    study.set_user_attr("space", "search_spaces/demo.yaml")
    study.set_user_attr("constraints", {"min_accuracy": None, "min_relative_accuracy": 0.9, "max_prefill_ms": None})
    base_acc, base_ms = BASELINE[0], BASELINE[1] * scale_ms
    if with_baseline:
        study.add_trial(optuna.trial.create_trial(
            values=[base_acc, base_ms], user_attrs={"role": "baseline", **trial_attrs(None, base_acc, base_ms, base_ms,
                                                                                      task, legacy)},
            constraints={"min_relative_accuracy": FLOOR - base_acc}))
        study.set_user_attr("baseline", {"trial": 0, "accuracy": base_acc, "prefill_ms": base_ms,
                                         "decode_ms_per_token": 12.0})
    rows = TRIALS if trials is None else trials
    for number in range(1, max(rows, default=0) + 1):
        if number not in rows:
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
                "failure": "RuntimeError: CUDA error: out of memory"}))
            continue
        method, layer, keep, image_pivots, text_pivots, accuracy, ms = rows[number]
        study.add_trial(pruned_trial(method, layer, keep, image_pivots, text_pivots, accuracy, ms * scale_ms,
                                     base_ms=base_ms, task=task, paper_default=number == 1 and method == "dart",
                                     legacy=legacy))
    return study


def pruned_trial(method: str, layer: int, keep: float, image_pivots: int | None, text_pivots: int | None,
                 accuracy: float, ms: float, *, base_ms: float = BASELINE[1], task: str = "dart_shapes",
                 paper_default: bool = False, legacy: bool = False) -> optuna.trial.FrozenTrial:
    """A complete trial as the Tuner stores it (`legacy`: as it did in schema 1): params, distributions, user
    attributes, constraint value."""
    pivots = {"n_image_pivots": image_pivots, "n_text_pivots": text_pivots} if method == "dart" else {}
    config = PruningConfig(method=method, layer=layer, keep_ratio=keep, options=pivots)
    role = {"role": "paper_default"} if paper_default else {}
    params = {("" if legacy else "dart.") + name: value for name, value in pivots.items()}
    return optuna.trial.create_trial(
        values=[accuracy, ms], params={"method": method, "layer": layer, "keep_ratio": keep, **params},
        distributions=distributions(method, legacy),
        user_attrs={**role, **trial_attrs(config, accuracy, ms, base_ms, task, legacy)},
        constraints={"min_relative_accuracy": FLOOR - accuracy})
