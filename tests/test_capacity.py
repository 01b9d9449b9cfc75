"""Capacity within a memory budget: the search for the largest batch that fits, the analytic count off CUDA, and
what a trial and `bench-serving` store and show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tuner.bench.serving import serving_runs, serving_sheet
from tuner.cli import app
from tuner.config import PruningConfig
from tuner.config.workload import Workload, WorkloadError
from tuner.evaluation.tasks import load_tasks
from tuner.measure.capacity import (
    ANALYTIC,
    MAX_REQUESTS,
    MEASURED,
    analytic_capacity,
    budget_bytes,
    largest_fitting,
    max_concurrent_requests,
    weight_bytes,
)
from tuner.measure.compare import latency_inputs
from tuner.measure.trial import TrialMeasurer
from tuner.models.loading import load_model
from tuner.results.record import TrialRecord

TASK = "dart_shapes"


@pytest.mark.parametrize("edge", [0, 1, 2, 3, 7, 8, 9, 100, 1023, 1024, MAX_REQUESTS - 1, MAX_REQUESTS])
def test_largest_fitting_finds_the_edge_in_logarithmic_probes(edge: int) -> None:
    """Catches an off-by-one at a power of two, a search past the limit, and a linear scan (a GPU minute each)."""
    probes: list[int] = []

    def fits(n: int) -> bool:
        probes.append(n)
        assert 1 <= n <= MAX_REQUESTS
        return n <= edge
    assert largest_fitting(fits) == edge
    assert len(probes) <= 2 * math.log2(MAX_REQUESTS) + 2


def test_analytic_capacity_counts_requests_next_to_the_weights() -> None:
    assert analytic_capacity(weights=1000, kv_per_request=100.0, budget=1950) == 9
    assert analytic_capacity(weights=2000, kv_per_request=100.0, budget=1950) == 0  # the weights alone do not fit
    assert analytic_capacity(weights=0, kv_per_request=1.0, budget=10**12) == MAX_REQUESTS
    with pytest.raises(ValueError, match="KV-cache bytes per request"):
        analytic_capacity(weights=0, kv_per_request=0.0, budget=1)


def test_weight_bytes_counts_tied_weights_once() -> None:
    """Catches a tied embedding and LM head counted twice (half the requests a deployment really fits)."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert weight_bytes(model) == 10 * 4 * 4


@pytest.mark.parametrize("bad", [0, -1.5, True, "24"])
def test_a_bad_memory_budget_is_one_line_naming_it(bad: object) -> None:
    with pytest.raises(WorkloadError) as caught:
        Workload(memory_budget_gb=bad)
    assert "latency.memory_budget_gb" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="memory budget"):
        budget_bytes(bad)


def test_tune_memory_budget_option_fails_in_one_line(tmp_path: Path) -> None:
    space = tmp_path / "serve.yaml"
    space.write_text("model: no/such-model\ntasks: [dart_shapes]\nmethods: [random]\nlayer: 1\nkeep_ratio: 0.5\n")
    result = CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 's.db'}",
                                      "--memory-budget-gb", "-2"])
    assert result.exit_code == 2 and "latency.memory_budget_gb" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks([TASK], subset_size=4, seed=0)


def test_repeated_latency_inputs_go_past_the_subset(model_and_tasks) -> None:
    """A memory probe at 9 requests on a 4-document subset: documents 0-3, 0-3, 0, left-padded together."""
    loaded, tasks = model_and_tasks
    nine = latency_inputs(loaded, tasks[0], 9, repeat=True)
    four = latency_inputs(loaded, tasks[0], 4)
    assert nine["input_ids"].shape[0] == 9
    width = four["input_ids"].shape[1]
    assert torch.equal(nine["input_ids"][4:8, -width:], four["input_ids"])
    with pytest.raises(ValueError, match="fewer than 9"):
        latency_inputs(loaded, tasks[0], 9)


def test_a_trial_stores_its_capacity_and_pruning_fits_more(model_and_tasks) -> None:
    """Catches a capacity not stored, not read back, or not the analytic count of the trial's own workload."""
    loaded, tasks = model_and_tasks
    budget_gib = 0.05
    workload = Workload(batch_size=2, new_tokens=3, repeats=1, warmup=0, memory_budget_gb=budget_gib)
    measurer = TrialMeasurer(loaded, tasks, workload)
    base = measurer.measure(None)
    pruned = measurer.measure(PruningConfig(method="random", layer=1, keep_ratio=0.1))
    for record in (base, pruned):
        again = TrialRecord.from_attrs(record.to_attrs())
        assert again.max_concurrent_source == ANALYTIC and again.memory_budget_bytes == budget_bytes(budget_gib)
        assert again.max_concurrent_requests == record.max_concurrent_requests
        kv_per_request = record.memory_bytes / workload.batch_size  # off CUDA: the batch's analytic KV bytes
        assert record.max_concurrent_requests == analytic_capacity(weight_bytes(loaded.model), kv_per_request,
                                                                   budget_bytes(budget_gib))
    assert pruned.max_concurrent_requests > base.max_concurrent_requests > 0
    assert TrialMeasurer(loaded, tasks, Workload(repeats=1, warmup=0)).measure(None).max_concurrent_requests is None


def test_bench_serving_shows_each_configurations_capacity(model_and_tasks) -> None:
    loaded, tasks = model_and_tasks
    configs = {"random 0.1": PruningConfig(method="random", layer=1, keep_ratio=0.1)}
    runs = serving_runs(loaded, tasks[0], configs, [2], new_tokens=3, repeats=1, warmup=0, memory_budget_gb=0.05)
    sheet = serving_sheet(runs, "serving")
    fits = {row["config"]: row["max_concurrent_requests"] for row in sheet.values}
    assert fits["random 0.1"] > fits["unpruned"] > 0
    assert any("0.05 GiB" in note for note in sheet.notes)
    plain = serving_sheet(serving_runs(loaded, tasks[0], configs, [1], new_tokens=3, repeats=1, warmup=0), "s")
    assert "max_concurrent_requests" not in plain.values[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measured capacity needs CUDA")
def test_measured_capacity_on_cuda_grows_with_pruning_and_budget(saved_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float16", device="cuda", attn_implementation="sdpa")
    tasks = load_tasks([TASK], subset_size=4, seed=0)
    workload = Workload(new_tokens=4)
    weights = weight_bytes(loaded.model)
    small, large = weights + (8 << 20), weights + (32 << 20)
    base = max_concurrent_requests(loaded, tasks[0], None, workload, small, 1.0)
    pruned = max_concurrent_requests(loaded, tasks[0], PruningConfig(method="random", layer=1, keep_ratio=0.1),
                                     workload, small, 1.0)
    more = max_concurrent_requests(loaded, tasks[0], None, workload, large, 1.0)
    assert base.source == MEASURED and pruned.requests >= base.requests and more.requests >= base.requests


def test_the_dashboard_names_a_points_capacity_next_to_its_four_numbers() -> None:
    from tuner.dashboard import workload_text
    row = {"ttft_ms": 20.0, "memory_source": "analytic_kv_cache", "memory_mb": 3.3, "workload_batch_size": 8,
           "workload_new_tokens": 16, "prefill_ms": 10.0, "e2e_ms": 50.0, "throughput": 80.0,
           "decode_batch_ms_per_token": 2.0, "max_concurrent_requests": 105.0}
    assert workload_text(row).endswith("105 requests fit in the memory budget")
    assert "requests fit" not in workload_text({**row, "max_concurrent_requests": math.nan})
