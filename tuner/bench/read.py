"""The `bench-read` measurement: how long the read side takes on a large stored study, next to Optuna's own load.

`build_study` writes a study the way `dart-tuner tune` stores one (the same study and trial attributes, the
per-sample scores and their intervals, the searched parameters with their distributions), `time_readers` times
Optuna's load of its trials and each reader (`studies`, the Pareto front, `export`, the dashboard's first render)
from a fresh storage connection, `repeats` times, and reports the medians.
"""

from __future__ import annotations

import io
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tuner.config import PruningConfig
from tuner.config.catalog import method_names
from tuner.config.environment import environment
from tuner.config.schema import config_attrs
from tuner.results.evidence import accuracy_evidence, latency_evidence

STUDY = "bench-read"
METHODS = ("dart", "fastv", "random", "pooling", "divprune")
N_SAMPLES = 60  # documents per trial, as the demo space's subset
VISION = 576
BASE_MS = 120.0
BASE_ACCURACY = 0.78
FAIL_EVERY = 40  # one failed trial in 40, as out-of-memory trials on a busy GPU
STOP_EVERY = 9  # one trial in 9 stopped early by the accuracy floor


@dataclass(frozen=True)
class ReaderTiming:
    """Median and every repeat's seconds of one reader."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _distributions() -> dict[str, optuna.distributions.BaseDistribution]:
    return {"method": CategoricalDistribution(METHODS), "layer": IntDistribution(1, 8),
            "keep_ratio": FloatDistribution(0.05, 0.6, log=True), "dart.n_image_pivots": IntDistribution(1, 8),
            "dart.n_text_pivots": IntDistribution(0, 8)}


def _scores(accuracy: float, rng: random.Random) -> list[float]:
    return [1.0 if rng.random() < accuracy else 0.0 for _ in range(N_SAMPLES)]


def _measured_attrs(config: PruningConfig | None, scores: list[float], baseline: list[float] | None,
                    prefill_ms: float, rng: random.Random) -> dict[str, Any]:
    """The user attributes `Tuner.measure` writes for one trial, with plausible numbers."""
    keep = 1.0 if config is None else float(config.keep_ratio)
    kept = max(1, round(keep * VISION))
    flops = int(4.1e12 * (0.25 + 0.75 * keep))
    rounds = [prefill_ms * (1 + rng.gauss(0, 0.02)) for _ in range(10)]
    accuracy = sum(scores) / len(scores)
    task_scores = [("textvqa_val", index, score) for index, score in enumerate(scores)]
    base_scores = None if baseline is None else [("textvqa_val", i, s) for i, s in enumerate(baseline)]
    spread = 0.03 * BASE_MS / prefill_ms
    return {
        **config_attrs(config),
        "accuracy": accuracy, "metrics": {"textvqa_val": {"exact_match": accuracy}}, "n_samples": N_SAMPLES,
        "accuracy_by_category": {"textvqa_val": accuracy}, "kept_vision_mean": float(kept),
        "kept_vision_min": kept, "kept_vision_max": kept, "vision_mean": float(VISION),
        "keep_ratio_achieved": kept / VISION, "prefill_ms": prefill_ms, "prefill_iqr_ms": 0.03 * prefill_ms,
        "prefill_repeats": len(rounds), "decode_ms_per_token": 21.0, "decode_iqr_ms": 0.4,
        "end_to_end_ms": prefill_ms + 84.0, "peak_memory_bytes": 15_800_000_000,
        "baseline_prefill_ms_same_run": BASE_MS, "speedup_same_run": BASE_MS / prefill_ms,
        "speedup_low": BASE_MS / prefill_ms - spread, "speedup_high": BASE_MS / prefill_ms + spread,
        "latency_noisy": False, "latency_warning": "", "prefill_flops": flops, "kv_cache_bytes": int(3.2e8 * keep),
        "flops_ratio": flops / 4.1e12, "latency_input_tokens": 640, "latency_input_kept_vision": kept,
        "samples": [[index, score, kept] for index, score in enumerate(scores)], "eval_seconds": 41.5,
        "feature_cache_hits": N_SAMPLES, "feature_cache_misses": 0,
        **latency_evidence(rounds), **accuracy_evidence(task_scores, base_scores),
    }


def _trial(number: int, rng: random.Random, baseline: list[float], floor: float) -> optuna.trial.FrozenTrial:
    """Trial `number` of the bench study: complete (sometimes stopped early) or, now and then, failed."""
    if number % FAIL_EVERY == FAIL_EVERY - 1:
        return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
            "failure": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "failure_type":
            "OutOfMemoryError"})
    method, layer, keep = rng.choice(METHODS), rng.randint(1, 8), round(rng.uniform(0.05, 0.6), 4)
    options = {"n_image_pivots": rng.randint(1, 8), "n_text_pivots": rng.randint(0, 8)} if method == "dart" else {}
    config = PruningConfig(method=method, layer=layer, keep_ratio=keep, options=options)
    accuracy = BASE_ACCURACY * (0.55 + 0.45 * keep ** 0.3) * rng.uniform(0.95, 1.02)
    prefill_ms = BASE_MS * (layer / 32 + (1 - layer / 32) * (0.18 + 0.82 * keep)) * rng.uniform(0.97, 1.03)
    scores = _scores(accuracy, rng)
    attrs = _measured_attrs(config, scores, baseline, prefill_ms, rng)
    value = attrs["accuracy"]
    if number % STOP_EVERY == 0:
        attrs.update({"stopped_early": True, "stop_reason": "cannot reach the accuracy floor after 24 documents",
                      "accuracy_partial": value, "accuracy_upper_bound": min(value, floor - 0.01)})
        value = attrs["accuracy"] = attrs["accuracy_upper_bound"]
    params = {"method": method, "layer": layer, "keep_ratio": keep, **{f"dart.{k}": v for k, v in options.items()}}
    distributions = {name: dist for name, dist in _distributions().items() if name in params}
    return optuna.trial.create_trial(values=[value, prefill_ms], params=params, distributions=distributions,
                                     user_attrs=attrs, constraints={"min_relative_accuracy": floor - value})


def build_study(url: str, n_trials: int, *, seed: int = 0, name: str = STUDY) -> optuna.Study:
    """A finished study of `n_trials` trials (the baseline first) in `url`, as `dart-tuner tune` stores one."""
    rng = random.Random(seed)
    study = optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"])
    study.set_user_attr("provenance", {
        "model_id": "llava-hf/llava-1.5-7b-hf", "revision": "a272c74", "family": "llava", "dtype": "float16",
        "device": "NVIDIA H100 80GB HBM3", "attn_implementation": "sdpa",
        "tasks": [{"name": "textvqa_val", "primary_metric": "exact_match", "size": N_SAMPLES, "total": 5000,
                   "seed": 0, "stratified_by": None, "hash": "5f0c1d0e8a3b4c2d9e7f6a5b4c3d2e1f0a9b8c7d"}],
        "latency": {"new_tokens": 16, "repeats": 10, "warmup": 2}, "versions": environment()})
    study.set_user_attr("objectives", ["accuracy", "prefill_ms"])
    study.set_user_attr("space", "search_spaces/demo.yaml")
    study.set_user_attr("constraints", {"min_accuracy": None, "min_relative_accuracy": 0.9, "max_prefill_ms": None})
    baseline = _scores(BASE_ACCURACY, rng)
    base_accuracy = sum(baseline) / len(baseline)
    floor = 0.9 * base_accuracy
    trials = [optuna.trial.create_trial(
        values=[base_accuracy, BASE_MS], user_attrs={"role": "baseline", **_measured_attrs(
            None, baseline, None, BASE_MS, rng)}, constraints={"min_relative_accuracy": floor - base_accuracy})]
    trials += [_trial(number, rng, baseline, floor) for number in range(1, n_trials)]
    study.add_trials(trials)
    study.set_user_attr("baseline", {"trial": 0, "accuracy": base_accuracy, "prefill_ms": BASE_MS,
                                     "decode_ms_per_token": 21.0})
    return study


# -- the readers ------------------------------------------------------------------------------------------------


def _optuna_load(url: str) -> None:
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def _studies(url: str) -> None:
    from rich.console import Console

    from tuner.results.storage import open_for_reading
    from tuner.results.tables import studies_table

    Console(file=io.StringIO(), width=200).print(studies_table(open_for_reading(url)))


def _front(url: str) -> None:
    from rich.console import Console

    from tuner.results import open_study
    from tuner.results.storage import open_for_reading
    from tuner.results.tables import pareto_table

    Console(file=io.StringIO(), width=200).print(pareto_table(open_study(open_for_reading(url), STUDY)))


def _export(url: str) -> None:
    from tuner.config.preset import preset_to_yaml
    from tuner.results import open_study
    from tuner.results.export import Rule, choose_trial, preset_from_trial
    from tuner.results.storage import open_for_reading

    study = open_study(open_for_reading(url), STUDY)
    preset_to_yaml(preset_from_trial(study, choose_trial(study, Rule(min_relative_accuracy=0.95))))


def _dashboard(url: str) -> None:
    """The dashboard app's first render (Streamlit's AppTest runs the real script), its caches cleared first."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    previous = os.environ.get("DART_TUNER_STORAGE")
    os.environ["DART_TUNER_STORAGE"] = url
    try:
        app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"),
                                default_timeout=600)
        app.run()
    finally:
        if previous is None:
            os.environ.pop("DART_TUNER_STORAGE")
        else:
            os.environ["DART_TUNER_STORAGE"] = previous
    if app.exception:
        raise RuntimeError(f"the dashboard failed: {app.exception[0].message}")


READERS: dict[str, Callable[[str], None]] = {"optuna load": _optuna_load, "studies": _studies, "front": _front,
                                             "export": _export, "dashboard": _dashboard}


def time_readers(url: str, names: list[str], repeats: int) -> list[ReaderTiming]:
    """Seconds of each reader over `repeats` runs, each from a fresh storage connection (no warm cache). The
    bundled methods are imported first, so the first reader timed does not also pay for importing torch."""
    method_names()
    timings = []
    for name in names:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            READERS[name](url)
            seconds.append(time.perf_counter() - start)
        timings.append(ReaderTiming(name, seconds))
    return timings
