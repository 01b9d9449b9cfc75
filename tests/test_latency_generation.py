"""The generation latency protocol: prefill vs decode split, exact token count, interleaving, setups applied."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import torch

import tuner
from tiny_vlms import greedy, make_inputs
from tuner.measure.latency import (
    GenerationTiming,
    Timing,
    _StepClock,
    _timed_generate,
    measure_generation_interleaved,
    time_generate,
)


def _sleep_on_forwards(model: torch.nn.Module, *, prefill_ms: float = 0.0,
                       decode_ms: float = 0.0) -> Callable[[], AbstractContextManager]:
    """Setup factory whose hook sleeps on the first model forward of a run (the prefill) and/or on the later ones."""

    @contextmanager
    def slowed() -> Iterator[None]:
        calls = [0]

        def hook(module: torch.nn.Module, args: tuple) -> None:
            time.sleep((prefill_ms if calls[0] == 0 else decode_ms) / 1000.0)
            calls[0] += 1

        handle = model.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return slowed


def test_structure_for_every_family(loaded: Any) -> None:
    """Every setup is reported with `repeats` positive, finite samples that add up (total covers prefill + decode)."""
    for family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
        model, processor = loaded(family, "sdpa")
        inputs = make_inputs(family, processor, batch=2)
        timings = measure_generation_interleaved(model, inputs, {"plain": None, "again": None},
                                                 new_tokens=3, repeats=2, warmup=0)
        assert set(timings) == {"plain", "again"}
        for timing in timings.values():
            assert isinstance(timing, GenerationTiming)
            assert timing.new_tokens == 3 and timing.peak_memory_bytes is None  # CPU: no peak memory
            for part in (timing.prefill, timing.decode, timing.total):
                assert isinstance(part, Timing) and part.repeats == 2
                assert all(math.isfinite(v) and v > 0 for v in part.samples_ms)
            for prefill, decode, total in zip(timing.prefill.samples_ms, timing.decode.samples_ms,
                                              timing.total.samples_ms):
                assert total >= prefill + 2 * decode - 1e-6  # end of generate comes after the last step


def test_to_dict_is_json_and_matches_the_timings() -> None:
    """The summary dict survives JSON and reports the medians, spreads and raw samples of each part."""
    timing = GenerationTiming(prefill=Timing((10.0, 12.0, 11.0)), decode=Timing((2.0, 3.0, 2.5)),
                              total=Timing((20.0, 22.0, 21.0)), new_tokens=4, peak_memory_bytes=None)
    data = json.loads(json.dumps(timing.to_dict()))
    assert data["prefill_ms_median"] == 11.0 and data["prefill_ms_iqr"] == timing.prefill.iqr_ms
    assert data["decode_ms_per_token_median"] == 2.5 and data["decode_ms_per_token_iqr"] == timing.decode.iqr_ms
    assert data["total_ms_median"] == 21.0
    assert data["repeats"] == 3 and data["new_tokens"] == 4 and data["peak_memory_bytes"] is None
    assert data["prefill_ms_samples"] == [10.0, 12.0, 11.0]
    assert data["decode_ms_per_token_samples"] == [2.0, 3.0, 2.5]
    assert data["total_ms_samples"] == [20.0, 22.0, 21.0]


def test_setups_entered_for_every_run_interleaved_and_wrapping_the_whole_generate(loaded: Any) -> None:
    """Each run (warm-up included) enters its setup once, rounds rotate, and all new_tokens forwards run inside."""
    model, processor = loaded("llava", "sdpa")
    inputs = make_inputs("llava", processor)
    entered: list[str] = []
    exited: list[str] = []
    current: list[str] = []
    forwards: list[str] = []

    def setup(name: str) -> Callable[[], AbstractContextManager]:
        @contextmanager
        def enter() -> Iterator[None]:
            entered.append(name)
            current.append(name)
            try:
                yield
            finally:
                current.pop()
                exited.append(name)
        return enter

    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(current[-1] if current else "none"))
    try:
        timings = measure_generation_interleaved(model, inputs, {n: setup(n) for n in "abc"},
                                                 new_tokens=3, repeats=2, warmup=1)
    finally:
        hook.remove()
    assert entered == list("abc" "bca" "cab")  # one warm-up round, then rotated rounds
    assert exited == entered
    assert forwards == [name for name in entered for _ in range(3)]  # prefill + 2 decode steps, each inside
    assert all(t.prefill.repeats == 2 for t in timings.values())


def test_exactly_new_tokens_despite_eos_and_the_models_generation_config(loaded: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation config that would stop at once (EOS = the first greedy token, max 1 token, beams) is overridden."""
    model, processor = loaded("llava", "sdpa")
    inputs = make_inputs("llava", processor)
    first_token = int(greedy(model, inputs, 1)[0][0, 0])
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = first_token
    config.max_new_tokens = 1
    config.num_beams = 2
    monkeypatch.setattr(model, "generation_config", config)
    with torch.no_grad():  # the forcing is real: left alone, generate stops after one token
        plain = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
    assert plain.shape[1] - inputs["input_ids"].shape[1] == 1
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        run = _timed_generate(model, inputs, 5, None)
        prefill, decode, total, peak = time_generate(model, inputs, new_tokens=5)
    finally:
        hook.remove()
    assert run.steps == 5 and len(forwards) == 10
    assert peak is None and 0 < prefill < total and 0 < decode and total >= prefill + 4 * decode - 1e-6


def test_step_clock_returns_scores_unchanged() -> None:
    """The clock is a pure observer: generate sees the very scores it passed in."""
    clock = _StepClock(torch.device("cpu"), 4)
    scores = torch.randn(2, 7)
    assert clock(torch.zeros(2, 3, dtype=torch.long), scores) is scores
    clock.mark()
    elapsed = clock.elapsed_ms()
    assert len(elapsed) == 2 and elapsed[0] == 0.0 and elapsed[1] >= 0.0


def test_pruning_setup_prunes_every_run(loaded: Any) -> None:
    """An apply_pruning factory gives each run a fresh handle that prunes that run's prefill and is removed after."""
    model, processor = loaded("qwen2_vl", "sdpa")
    inputs = make_inputs("qwen2_vl", processor)
    handles: list[tuner.PruningHandle] = []
    config = tuner.PruningConfig(method="random", layer=1, keep_ratio=0.25)

    def pruned() -> tuner.PruningHandle:
        handles.append(tuner.apply_pruning(model, config))
        return handles[-1]

    timings = measure_generation_interleaved(model, inputs, {"plain": None, "pruned": pruned},
                                             new_tokens=3, repeats=2, warmup=1)
    assert len(handles) == 3  # warm-up + 2 timed runs
    for handle in handles:
        assert len(handle.requests) == 1 and not handle.active  # one prefill, hooks removed afterwards
        stats = handle.requests[0]
        assert 0 < stats.n_kept_vision[0] < stats.n_vision[0]
    assert getattr(model, "_dart_tuner_handle", None) is None
    assert timings["pruned"].prefill.repeats == 2


def test_slow_prefill_and_slow_decode_land_in_their_own_part(loaded: Any) -> None:
    """A sleep on the prefill forward shows up only in the prefill; a sleep on each decode forward only per token.

    Robust on a loaded machine: the sleeps give hard lower bounds, and the "not in the other part" checks use the
    fastest of the runs against thresholds far below what a misattribution would add (>= 100 ms / >= 150 ms), so a
    busy machine slowing the tiny model's own forwards to tens of ms does not fail it.
    """
    model, processor = loaded("llava", "sdpa")
    inputs = make_inputs("llava", processor)
    prefill_sleep, decode_sleep = 200.0, 150.0
    setups = {"plain": None,
              "slow_prefill": _sleep_on_forwards(model, prefill_ms=prefill_sleep),
              "slow_decode": _sleep_on_forwards(model, decode_ms=decode_sleep)}
    t = measure_generation_interleaved(model, inputs, setups, new_tokens=3, repeats=5, warmup=1)
    slow_prefill, slow_decode = t["slow_prefill"], t["slow_decode"]
    assert min(slow_prefill.prefill.samples_ms) >= prefill_sleep
    assert min(slow_decode.decode.samples_ms) >= decode_sleep
    assert min(slow_decode.total.samples_ms) >= 2 * decode_sleep
    assert min(slow_prefill.decode.samples_ms) < prefill_sleep / 2 - 40.0  # 200 ms over 2 decode steps would be 100
    assert min(slow_decode.prefill.samples_ms) < decode_sleep - 70.0
    assert min(t["plain"].prefill.samples_ms) < prefill_sleep - 100.0  # the hooks were removed after their runs


@pytest.mark.parametrize(("kwargs", "name"), [({"new_tokens": 1}, "new_tokens"), ({"repeats": 0}, "repeats"),
                                              ({"warmup": -1}, "warmup")])
def test_bad_arguments_are_rejected_before_any_run(kwargs: dict[str, int], name: str) -> None:
    """Invalid settings fail fast with the argument's name, without touching the model."""
    with pytest.raises(ValueError, match=name):
        measure_generation_interleaved(object(), {}, {"a": None}, **kwargs)
    if name == "new_tokens":
        with pytest.raises(ValueError, match=name):
            time_generate(object(), {}, new_tokens=1)
