"""Evaluation through lmms-eval: the `dart_tuner` model class, `Evaluator`, task subsets, errors and `eval` CLI.

Everything runs offline on the tiny random VLMs of conftest and the bundled `dart_shapes` task. Models and
prepared tasks are loaded once per module; evaluations that several tests read are memoised in `runs`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from typer.testing import CliRunner

from tuner.cli import app
from tuner.config import PruningConfig
from tuner.config.preset import Preset, PresetError, load_preset, save_preset
from tuner.evaluation.lmms_compat import import_lmms_eval
from tuner.evaluation.lmms_model import DartTunerLMM, GenerationFailure
from tuner.evaluation.runner import Evaluator
from tuner.evaluation.tasks import TaskNotFoundError, load_tasks
from tuner.models import load_model
from tuner.models.families import supported_model_types
from tuner.models.loading import ModelLoadError
from tuner.pruning import PruningMethod, Selection, SelectionContext, register_method

simple_evaluate = import_lmms_eval("evaluator").evaluator.simple_evaluate

TASK = "dart_shapes"
FAMILIES = ("llava", "qwen2_vl")
LIMIT = 4  # documents per evaluation; batch size 3 leaves a partial last batch of 1
MANY = 1000  # max_failures where empty answers of the random models are not what is tested
DART = PruningConfig(method="dart", layer=1, keep_ratio=0.25)
RANDOM = PruningConfig(method="random", layer=1, keep_ratio=0.25)
CONFIGS = {"unpruned": None, "dart": DART, "random": RANDOM}


def _evaluate(model: Any, prepared: list, **kwargs: Any) -> dict:
    """simple_evaluate on the prepared task objects, with their TaskManager (no 2,000-task index) and no seeding."""
    results = simple_evaluate(model=model, tasks=[t.task for t in prepared], task_manager=prepared[0].manager,
                              bootstrap_iters=0, log_samples=True, verbosity="WARNING", random_seed=None,
                              numpy_random_seed=None, torch_random_seed=None, **kwargs)
    assert results is not None
    return results


def _answers(results: dict) -> dict[int, str]:
    """doc_id -> filtered answer."""
    out = {}
    for sample in results["samples"][TASK]:
        response = sample["filtered_resps"]
        while isinstance(response, list):
            response = response[0]
        out[int(sample["doc_id"])] = response
    return out


def _messages(error: BaseException) -> str:
    """Every message in an exception's cause/context chain (lmms-eval may wrap construction errors)."""
    parts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


@pytest.fixture(scope="module")
def prepared() -> list:
    tasks = load_tasks([TASK], subset_size=LIMIT, seed=0)
    assert [t.name for t in tasks] == [TASK] and tasks[0].subset.size == LIMIT
    return tasks


@pytest.fixture(scope="module")
def models(saved_dirs: dict[str, Path]) -> dict:
    """Each family loaded once through the real loading path (config check, processor, adapter)."""
    return {family: load_model(saved_dirs[family], device="cpu") for family in FAMILIES}


@pytest.fixture(scope="module")
def runs(models: dict, prepared: list):
    """(family, config name, batch size) -> (simple_evaluate results, per-doc records), each run once."""
    memo: dict[tuple[str, str, int], tuple[dict, dict]] = {}

    def get(family: str, config: str, batch_size: int) -> tuple[dict, dict]:
        key = (family, config, batch_size)
        if key not in memo:
            lm = DartTunerLMM.from_loaded(models[family], CONFIGS[config], batch_size=batch_size,
                                          max_failures=MANY)
            memo[key] = (_evaluate(lm, prepared), dict(lm.records))
        return memo[key]

    return get


# --- 1. simple_evaluate with a DartTunerLMM instance -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_simple_evaluate_scores_every_doc_and_keeps_the_budget(family, runs):
    """Catches missing metrics/samples, records keyed wrongly, and kept counts that ignore the config (or prune
    when unpruned)."""
    for name in ("unpruned", "random"):
        results, records = runs(family, name, 1)
        metrics = results["results"][TASK]
        assert isinstance(metrics["exact_match,none"], float) and 0.0 <= metrics["exact_match,none"] <= 1.0
        assert sorted(_answers(results)) == list(range(LIMIT))
        assert set(records) == {(TASK, doc) for doc in range(LIMIT)}
        config = CONFIGS[name]
        for record in records.values():
            assert record.n_vision > 0 and record.n_tokens > record.n_vision
            expected = record.n_vision if config is None else config.budget_for(record.n_vision)
            assert record.n_kept_vision == expected
            assert 0 < record.n_output_tokens <= 8  # the task's max_new_tokens
    _, pruned = runs(family, "random", 1)
    assert all(r.n_kept_vision < r.n_vision for r in pruned.values())


# --- 2. batch sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["unpruned", "dart"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_does_not_change_answers_or_counts(family, config, runs):
    """Catches left-padding bugs (positions, masks, M-RoPE, padded rows in the pruning selection), answers
    assigned to the wrong request, and a dropped or duplicated partial last batch."""
    single, single_records = runs(family, config, 1)
    # The documents differ in prompt length, so a request answered with another row's output would show.
    assert len({r.n_tokens for r in single_records.values()}) > 1
    for batch_size in (2, 3):
        batched, batched_records = runs(family, config, batch_size)
        assert _answers(batched) == _answers(single), f"batch_size={batch_size}"
        assert batched_records == single_records, f"batch_size={batch_size}"


# --- 3. config switch and lmms-eval's response cache ---------------------------------------------------------------

def test_config_switch_is_not_served_from_the_response_cache(models, prepared, tmp_path):
    """Catches a cache key that ignores the pruning config (answers of config A reused for config B)."""
    config_a = PruningConfig(method="random", layer=1, keep_ratio=0.5)
    config_b = PruningConfig(method="random", layer=1, keep_ratio=0.25)
    cache = str(tmp_path / "cache")
    lm = DartTunerLMM.from_loaded(models["llava"], config_a, max_failures=MANY)
    repr_a = repr(lm)

    first = _evaluate(lm, prepared, use_cache=cache)
    assert len(lm.records) == LIMIT
    assert all(r.n_kept_vision == config_a.budget_for(r.n_vision) for r in lm.records.values())
    assert all(_answers(first).values()), "empty answers are not cached; the cache checks below need answers"

    lm.records.clear()
    again = _evaluate(lm, prepared, use_cache=cache)
    assert lm.records == {}, "the same config twice should be answered from the cache (is the cache active?)"
    assert _answers(again) == _answers(first)

    lm.set_config(config_b)
    assert repr(lm) != repr_a
    lm.records.clear()
    _evaluate(lm, prepared, use_cache=cache)
    assert set(lm.records) == {(TASK, doc) for doc in range(LIMIT)}, "config B was served config A's answers"
    assert all(r.n_kept_vision == config_b.budget_for(r.n_vision) for r in lm.records.values())


# --- 4. failures ----------------------------------------------------------------------------------------------------

def test_empty_generations_fail_unless_tolerated(models, prepared):
    """Catches empty answers silently scored as wrong instead of failing the run, and max_failures ignored."""
    loaded = models["llava"]
    generation_config = loaded.model.generation_config
    eos = loaded.processor.tokenizer.eos_token_id
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    saved = generation_config.suppress_tokens
    generation_config.suppress_tokens = [i for i in range(vocab) if i != eos]
    try:
        strict = DartTunerLMM.from_loaded(loaded, RANDOM, max_failures=0)
        with pytest.raises(GenerationFailure, match=rf"{LIMIT} of {LIMIT} generations were empty"):
            _evaluate(strict, prepared)
        lenient = DartTunerLMM.from_loaded(loaded, RANDOM, max_failures=LIMIT)
        results = _evaluate(lenient, prepared)
        assert _answers(results) == {doc: "" for doc in range(LIMIT)}
        assert results["results"][TASK]["exact_match,none"] == 0.0
        assert all(r.empty for r in lenient.records.values()) and len(lenient.records) == LIMIT
    finally:
        generation_config.suppress_tokens = saved


def test_exception_in_generate_names_task_doc_and_cause(models, prepared):
    """Catches exceptions swallowed into empty answers, or failures that do not say which document broke."""
    loaded = models["llava"]

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    loaded.model.generate = boom
    try:
        lm = DartTunerLMM.from_loaded(loaded, None, max_failures=MANY)
        with pytest.raises(GenerationFailure) as caught:
            _evaluate(lm, prepared)
    finally:
        del loaded.model.generate
    message = str(caught.value)
    assert f"{TASK}/0" in message and "RuntimeError: boom" in message
    assert isinstance(caught.value.__cause__, RuntimeError)


# --- 5. by name through the entry point -------------------------------------------------------------------------

@pytest.fixture
def constructed(monkeypatch):
    """The DartTunerLMM instances lmms-eval builds by name, captured when they answer."""
    instances: list[DartTunerLMM] = []
    original = DartTunerLMM.generate_until

    def capture(self, requests):
        instances.append(self)
        return original(self, requests)

    monkeypatch.setattr(DartTunerLMM, "generate_until", capture)
    return instances


def test_entry_point_builds_the_configured_model(saved_dirs, prepared, constructed, tmp_path):
    """Catches a broken `lmms_eval.models` registration and model_args parsed into the wrong config (types,
    preset)."""
    model_dir = saved_dirs["llava"]
    results = _evaluate("dart_tuner", prepared, limit=2,
                        model_args=f"pretrained={model_dir},method=random,layer=1,keep_ratio=0.5,device=cpu,"
                                   f"max_failures={MANY}")
    assert "exact_match,none" in results["results"][TASK]
    (lm,) = constructed
    assert lm.config == PruningConfig(method="random", layer=1, keep_ratio=0.5)
    assert len(lm.records) == 2
    assert all(r.n_kept_vision == lm.config.budget_for(r.n_vision) for r in lm.records.values())

    preset_config = PruningConfig(method="dart", layer=2, keep_ratio=0.25,
                                  options={"n_image_pivots": 2, "n_text_pivots": 1})
    path = save_preset(Preset(config=preset_config), tmp_path / "preset.yaml")
    results = _evaluate("dart_tuner", prepared, limit=2,
                        model_args=f"pretrained={model_dir},preset={path},device=cpu,max_failures={MANY}")
    assert "exact_match,none" in results["results"][TASK]
    assert constructed[-1] is not lm and constructed[-1].config == preset_config
    assert all(r.n_kept_vision == preset_config.budget_for(r.n_vision) for r in constructed[-1].records.values())


@pytest.mark.parametrize(("args", "expected"), [
    ("method=random,keep_ratio=0.5,bogus_key=1", r"unknown model_args \['bogus_key'\]"),
    ("preset=whatever.yaml,method=dart,keep_ratio=0.5", r"preset.*not both"),
    ("keep_ratio=0.5", r"\['keep_ratio'\] need method="),
])
def test_bad_model_args_name_the_culprit(saved_dirs, prepared, args, expected):
    """Catches model_args that are silently ignored or accepted in a contradictory combination."""
    with pytest.raises(Exception) as caught:
        _evaluate("dart_tuner", prepared, limit=1, model_args=f"pretrained={saved_dirs['llava']},device=cpu,{args}")
    messages = _messages(caught.value)
    assert "ValueError" in messages and re.search(expected, messages), messages


# --- 6. Evaluator and subsets -------------------------------------------------------------------------------------

def test_evaluator_reports_the_subset_and_kept_ratio(models, prepared):
    """Catches samples mapped to the wrong documents of the full split and kept-token stats that are not read
    from the hooks."""
    evaluator = Evaluator(models["llava"], prepared, max_failures=MANY)
    result = evaluator.evaluate(RANDOM)
    assert result.n_samples == LIMIT == evaluator.n_requests
    assert [s.doc_index for s in result.samples] == prepared[0].doc_indices
    assert [s.category for s in result.samples] == prepared[0].categories
    assert set(result.metrics) == {TASK} and result.accuracy == result.metrics[TASK]["exact_match"]
    stats = result.kept_vision_stats()
    assert stats["keep_ratio_achieved"] == pytest.approx(0.25, abs=0.02)
    assert all(s.n_kept_vision == RANDOM.budget_for(s.n_vision) and s.n_vision > 0 for s in result.samples)
    assert result.to_dict()["n_samples"] == LIMIT


def test_a_schedule_is_counted_per_stage(models, prepared):
    """Each stage's kept count reaches the samples and the stats, and FLOPs / KV bytes count layers [K_i, K_i+1)
    at what stage i kept."""
    from tuner.config import Stage
    from tuner.measure.compare import latency_inputs, measure_latency, vision_counts
    from tuner.models.cost import kv_cache_bytes, prefill_flops

    schedule = PruningConfig(method="random", layer=1, keep_ratio=0.5, stages=[Stage(2, 0.5)])
    loaded = models["llava"]
    result = Evaluator(loaded, prepared, max_failures=MANY).evaluate(schedule)
    for sample in result.samples:
        first = schedule.budget_for(sample.n_vision)
        assert sample.stage_kept_vision == (first, schedule.stage_config(1).budget_for(first))
        assert sample.n_kept_vision == sample.stage_kept_vision[-1]
    stats = result.kept_vision_stats()
    assert stats["stage_kept_vision_mean"][1] == stats["kept_vision_mean"] < stats["stage_kept_vision_mean"][0]
    assert "stage_kept_vision_mean" not in Evaluator(loaded, prepared, max_failures=MANY).evaluate(
        RANDOM).kept_vision_stats()
    inputs = latency_inputs(loaded, prepared[0])
    _, cost = measure_latency(loaded, inputs, {"s": schedule}, new_tokens=2, repeats=1, warmup=0)["s"]
    n, vision = int(inputs["attention_mask"][0].sum()), vision_counts(loaded, inputs)[0]
    first = schedule.budget_for(vision)
    assert cost.stage_kept_vision == (first, schedule.stage_config(1).budget_for(first))
    kept = [n - vision + k for k in cost.stage_kept_vision]
    dims = loaded.adapter.spec.text_dims(loaded.model.config)
    assert cost.prefill_flops == prefill_flops(dims, n, kept, [1, 2]) < prefill_flops(dims, n, kept[0], 1)
    assert cost.kv_cache_bytes == kv_cache_bytes(dims, n, kept, [1, 2], loaded.dtype)


def test_subset_is_reproducible_by_seed():
    """Catches unseeded subsets and a TaskManager cache that re-subsets an already cut dataset."""
    first, again, other = (load_tasks([TASK], subset_size=6, seed=seed)[0] for seed in (0, 0, 1))
    assert first.doc_indices == again.doc_indices and first.subset.hash == again.subset.hash
    assert first.subset.total == again.subset.total == 600
    assert len(first.task.eval_docs) == 6
    assert other.subset.hash != first.subset.hash and other.doc_indices != first.doc_indices
    assert first.subset.stratified_by == "category"
    assert len(set(first.categories)) > 1  # stratified: not a prefix of one category


# --- 7. bad inputs -------------------------------------------------------------------------------------------------

def test_load_model_rejects_missing_folder():
    """Catches a missing local folder being sent to the Hub (slow, confusing error)."""
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model("/nonexistent/dart_tuner_model", device="cpu")


def test_load_model_rejects_unsupported_architecture(tmp_path):
    """Catches an unsupported model loaded (and failing later) instead of being refused with the supported list."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path / "llama", device="cpu")
    message = str(caught.value)
    assert "'llama'" in message and all(model_type in message for model_type in supported_model_types())


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_weights_are_one_clear_error(saved_dirs, tmp_path, damage: str):
    """A model folder whose weights are gone or cut short must be a ModelLoadError naming the folder (one line on
    the command line), not a safetensors traceback."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_dirs["llava"], folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"cannot load the weights of model '{folder}'"):
        load_model(folder, device="cpu")


def test_load_model_unknown_hub_id_fails_fast_offline():
    """Catches hub look-ups that hang or raise raw OSErrors when offline."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="nobody/no-such-model-xyz"):
        load_model("nobody/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - start < 10


def test_unknown_task_is_refused():
    """Catches unknown task names passing silently (lmms-eval skips them) instead of TaskNotFoundError."""
    with pytest.raises(TaskNotFoundError, match="no_such_task_xyz"):
        load_tasks(["no_such_task_xyz"])


def test_missing_preset_is_a_preset_error(tmp_path):
    """Catches a raw OSError (or a default config) for a preset file that does not exist."""
    with pytest.raises(PresetError, match="missing.yaml"):
        load_preset(tmp_path / "missing.yaml")


# --- 8. the eval command --------------------------------------------------------------------------------------------

def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


def test_eval_cli_compares_config_with_baseline(saved_dirs, tmp_path):
    """Catches baseline/config rows swapped, latency on different inputs, and costs not using the kept counts."""
    out = tmp_path / "out.json"
    result = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--method", "dart",
                      "--layer", "1", "--keep-ratio", "0.25", "--limit", "4", "--repeats", "2", "--warmup", "0",
                      "--new-tokens", "3", "--max-failures", "4", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    base, pruned = data["rows"]
    assert [base["name"], pruned["name"]] == ["unpruned", "dart 0.25"]
    assert base["config"] is None and pruned["config"]["keep_ratio"] == 0.25
    assert base["cost"]["n_tokens"] == pruned["cost"]["n_tokens"]
    assert base["cost"]["n_kept_vision"] == base["cost"]["n_vision"] > 0
    assert pruned["cost"]["n_kept_vision"] == DART.budget_for(base["cost"]["n_vision"])
    for key in ("n_kept_vision", "prefill_flops", "kv_cache_bytes"):
        assert pruned["cost"][key] < base["cost"][key], key
    for row in (base, pruned):
        latency = row["latency"]
        assert latency["repeats"] == 2 and latency["new_tokens"] == 3
        assert latency["prefill_ms_median"] > 0 and latency["decode_ms_per_token_median"] > 0
        assert latency["total_ms_median"] > 0
        assert row["accuracy"]["n_samples"] == len(row["accuracy"]["samples"]) == 4
    assert [s["n_kept_vision"] for s in pruned["accuracy"]["samples"]] == [
        DART.budget_for(s["n_vision"]) for s in pruned["accuracy"]["samples"]]
    assert data["tasks"][0]["subset"]["size"] == 4


def test_eval_cli_missing_model_exits_2_with_message():
    """Catches a traceback (exit 1) instead of a one-line error naming the model."""
    result = _invoke(["eval", "--model", "/nonexistent", "--task", TASK, "--limit", "1"])
    assert result.exit_code == 2
    assert "/nonexistent" in result.output and "no such directory" in result.output
    assert "Traceback" not in result.output


def test_eval_cli_missing_preset_exits_2_naming_the_file(saved_dirs, tmp_path):
    """Catches a missing preset crashing (or being ignored) instead of a clear exit-2 error naming the file."""
    missing = tmp_path / "missing.yaml"
    result = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--preset", str(missing)])
    assert result.exit_code == 2, repr(result.exception)
    assert str(missing) in result.output and "Traceback" not in result.output


def test_eval_cli_invalid_method_exits_2_naming_it(saved_dirs):
    """Catches an invalid pruning config on the command line crashing instead of a clear exit-2 error."""
    result = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--method", "no_such_method",
                      "--keep-ratio", "0.5"])
    assert result.exit_code == 2, repr(result.exception)
    assert "no_such_method" in result.output and "Traceback" not in result.output


def test_eval_cli_options_reach_their_methods_only():
    """`--option key=value` goes to every --method that takes it, `method.key=value` to that one; the old
    --image-pivots / --text-pivots are DART's options. A misdirected option is one line naming it."""
    from tuner.cli.common import options_for

    given = {"alpha": 0.5, "dart.n_image_pivots": 2, "dart.pivot_order": "rank"}
    assert options_for("dart", given, ["dart", "fastv"]) == {"n_image_pivots": 2, "pivot_order": "rank"}
    assert options_for("fastv", given, ["dart", "fastv"]) == {"alpha": 0.5}
    assert options_for("random", given, ["dart", "fastv", "random"]) == {}
    with pytest.raises(ValueError, match="--option window: no --method takes it"):
        options_for("fastv", {"window": 3}, ["fastv"])
    with pytest.raises(ValueError, match="--option dart.quota: 'dart' is not one of the --method values"):
        options_for("fastv", {"dart.quota": 3}, ["fastv"])


def test_eval_cli_schedule_options_reach_every_stage_of_their_method():
    from tuner.cli.common import with_stage_options
    from tuner.config import parse_schedule

    config = with_stage_options(parse_schedule("fastv@2:0.5>dart@4:0.5>6:0.5"),
                                {"alpha": 0.3, "dart.n_image_pivots": 2})
    stages = config.stage_configs()
    assert stages[0].options == {"alpha": 0.3}
    assert [s.options["n_image_pivots"] for s in stages[1:]] == [2, 2]
    assert with_stage_options(parse_schedule("dart@2:0.5>4:0.5"), {"n_text_pivots": 1}).stage_config(1).options[
        "n_text_pivots"] == 1  # a stage without a method inherits the first stage's


@pytest.mark.parametrize(("flags", "words"), [
    (["--method", "dart", "--image-pivots", "-1"], "dart option n_image_pivots must be an int >= 0, got -1"),
    (["--method", "dart", "--option", "dart.n_text_pivots=x"], "dart option n_text_pivots must be an int"),
    (["--method", "fastv", "--option", "window=3"], "--option window: no --method takes it"),
])
def test_eval_cli_bad_options_exit_2_before_loading(flags, words):
    result = _invoke(["eval", "--model", "/nonexistent", "--task", TASK, "--keep-ratio", "0.5", *flags])
    assert result.exit_code == 2, repr(result.exception)
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output


def test_eval_cli_layer_beyond_the_model_exits_2_before_any_evaluation(saved_dirs):
    """K at or past the decoder's layer count: one line naming K and the count, before the baseline is scored."""
    result = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--method", "dart",
                      "--keep-ratio", "0.5", "--layer", "9", "--limit", "2"])
    assert result.exit_code == 2, repr(result.exception)
    assert "layer K=9 is out of range: the model has 4 decoder layers" in " ".join(result.output.split())


def test_eval_cli_runs_a_schedule_given_as_text(saved_dirs, tmp_path):
    """Catches --schedule being ignored or read as one stage: the row is the schedule, every stage prunes."""
    out = tmp_path / "out.json"
    result = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", TASK, "--schedule",
                      "random@1:0.5>fastv@2:0.5", "--limit", "2", "--repeats", "1", "--warmup", "0",
                      "--new-tokens", "2", "--max-failures", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    base, pruned = json.loads(out.read_text())["rows"]
    assert pruned["name"] == "random@1:0.5>fastv@2:0.5"
    assert pruned["config"]["stages"] == [{"layer": 2, "keep_ratio": 0.5, "method": "fastv"}]
    first = PruningConfig(method="random", layer=1, keep_ratio=0.5)
    assert pruned["cost"]["n_kept_vision"] == first.budget_for(first.budget_for(base["cost"]["n_vision"]))


@pytest.mark.parametrize(("extra", "message"), [
    (["--schedule", "fastv@1:0.5>4:2"], "stage 2 '4:2': amount '2' is not a share in (0, 1]"),
    (["--schedule", "fastv@1:0.5", "--method", "dart"], "give one of --preset, --method or --schedule"),
    (["--schedule", "fastv@1:0.5", "--layer", "2"], "--schedule sets every stage's layer and amount"),
])
def test_eval_cli_bad_schedule_exits_2_before_loading(extra, message):
    """A bad schedule, or one mixed with --method / --layer, fails in one line before the model is read."""
    result = _invoke(["eval", "--model", "/nonexistent", "--task", TASK, *extra])
    assert result.exit_code == 2, repr(result.exception)
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert "/nonexistent" not in result.output


@register_method("test_slow_selection")
class SlowSelection(PruningMethod):
    """Test-only: keeps each row's first vision tokens after sleeping SLEEP_S, so its selection time is known."""

    def select(self, ctx: SelectionContext) -> Selection:
        time.sleep(SLEEP_S)
        return Selection([ctx.vision_positions(row)[:budget] for row, budget in enumerate(ctx.budgets)])


SLEEP_S = 0.03


def test_selection_time_is_measured_per_prefill_and_summed_over_stages(models, prepared):
    """The hooks time each stage's selection; eval's latency run reports the median next to the prefill."""
    from tuner.config import Stage
    from tuner.measure.compare import latency_inputs, measure_latency
    from tuner.pruning import apply_pruning

    loaded = models["llava"]
    inputs = latency_inputs(loaded, prepared[0])
    schedule = PruningConfig(method="test_slow_selection", layer=1, keep_ratio=0.5, stages=[Stage(2, 0.5)])
    with apply_pruning(loaded.model, schedule) as handle, torch.no_grad():
        started = time.perf_counter()
        loaded.model(**inputs)
        forward_ms = (time.perf_counter() - started) * 1e3
    (stats,) = handle.requests
    assert 2 * SLEEP_S * 1e3 <= stats.select_ms < forward_ms  # both stages, inside the forward
    measured = measure_latency(loaded, inputs, {"unpruned": None, "s": schedule}, new_tokens=2, repeats=3, warmup=0)
    assert measured["unpruned"][1].select_ms is None
    assert 2 * SLEEP_S * 1e3 <= measured["s"][1].select_ms < measured["s"][0].prefill.median_ms
