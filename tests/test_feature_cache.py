"""The image-feature cache (`tuner.models.feature_cache`): exact, bounded, keyed on every input, off while timing.

Real tiny models of conftest (no mocks): the vision tower's calls are counted with a forward hook on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

import tiny_vlms
from tuner.cli import app
from tuner.config import PruningConfig
from tuner.evaluation.runner import Evaluator
from tuner.evaluation.tasks import load_tasks
from tuner.measure.compare import latency_inputs, measure_latency
from tuner.models.feature_cache import MB, FeatureCache
from tuner.models.loading import load_model
from tuner.pruning import apply_pruning
from tuner.search.space import SpaceError, parse_space

DART = PruningConfig(method="dart", layer=1, keep_ratio=0.25)
TASK = "dart_shapes"


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder of the tiny models (LLaVA: `vision_tower`, Qwen: `visual`)."""
    inner = model.base_model
    return getattr(inner, "vision_tower", None) or inner.visual


@contextmanager
def _counting(module: torch.nn.Module) -> Any:
    """Count forward calls of `module` inside the block."""
    calls = [0]
    hook = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        hook.remove()


def _generate(model: torch.nn.Module, inputs: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly 4 new tokens without sampling: (sequences, per-step logits)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, 1)


def _run(model: torch.nn.Module, inputs: Any, cache: FeatureCache | None, family: str,
         **options: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
    """Tokens, logits and kept indices under DART, with `cache` attached (or none), and vision-tower calls."""
    spec = tiny_vlms.family_of(family)
    with _counting(_vision_tower(model)) as calls, apply_pruning(model, DART) as handle:
        if cache is None:
            tokens, logits = _generate(model, inputs, **options)
        else:
            with cache.attach(model, spec):
                tokens, logits = _generate(model, inputs, **options)
        kept = [k.clone() for k in handle.last_kept]
    return tokens, logits, kept, calls[0]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_cold_warm_and_off_generate_the_same_tokens_and_keep_the_same_positions(family, loaded) -> None:
    """Catches features served for the wrong images, a cache that changes the logits, one that still runs the
    vision tower on a hit, and a wrapper left on the model."""
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)  # two different images, one row left-padded
    cache = FeatureCache(64 * MB)
    off = _run(model, inputs, None, family)
    cold = _run(model, inputs, cache, family)
    assert cache.stats().misses == 1 and cache.stats().hits == 0 and cold[3] > 0
    warm = _run(model, inputs, cache, family)
    assert cache.stats().hits == 1 and cache.stats().misses == 1 and cache.stats().bypassed == 0
    assert warm[3] == 0, "the vision tower ran on a cache hit"
    assert off[3] > 0
    for run in (cold, warm):
        assert torch.equal(run[0], off[0])
        assert torch.equal(run[1], off[1])
        assert len(run[2]) == len(off[2]) == 2 and all(torch.equal(a, b) for a, b in zip(run[2], off[2]))
    owner = tiny_vlms.family_of(family).image_features_owner(model)
    assert "get_image_features" not in vars(owner)


def test_beam_search_on_a_hit_matches_the_uncached_run(loaded) -> None:
    """generate() rewrites `pooler_output` in place when it expands a batch for beams: catches a cache that hands
    out its stored object (the second warm run would then get features doubled by the first)."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    cache = FeatureCache(64 * MB)
    beams = {"num_beams": 2}
    off = _run(model, inputs, None, "llava", **beams)
    for _ in range(3):  # cold, then two warm runs
        tokens, logits, kept, _ = _run(model, inputs, cache, "llava", **beams)
        assert torch.equal(tokens, off[0]) and torch.equal(logits, off[1])
    assert cache.stats().hits == 2


def _features(model: torch.nn.Module, family: str, inputs: dict[str, torch.Tensor]) -> Any:
    """The model's image features for the image inputs of `inputs` (what the forward asks for)."""
    owner = tiny_vlms.family_of(family).image_features_owner(model)
    images = {key: inputs[key] for key in ("pixel_values", "image_sizes", "image_grid_thw") if key in inputs}
    with torch.inference_mode():
        return owner.get_image_features(**images, return_dict=True)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_another_image_or_another_size_is_a_miss(family, loaded) -> None:
    """Catches a key that ignores the pixels or the image size (`image_sizes` / `image_grid_thw`)."""
    model, processor = loaded(family, "sdpa")
    spec = tiny_vlms.family_of(family)
    (width, height), _ = spec.tiny_image_sizes
    image = tiny_vlms._make_image(width, height, seed=0)
    prompt = spec.fallback_prompt("Describe it.", 1)
    same = processor(images=[image], text=[prompt], return_tensors="pt")
    other = processor(images=[tiny_vlms._make_image(width, height, seed=5)], text=[prompt], return_tensors="pt")
    resized = processor(images=[image.resize((width + 56, height))], text=[prompt], return_tensors="pt")
    cache = FeatureCache(64 * MB)
    with cache.attach(model, spec):
        first = _features(model, family, same)
        again = _features(model, family, same)
        assert (cache.stats().hits, cache.stats().misses) == (1, 1)
        _features(model, family, other)
        assert (cache.stats().hits, cache.stats().misses) == (1, 2)
        sized = _features(model, family, resized)
        assert (cache.stats().hits, cache.stats().misses) == (1, 3)
    assert sum(len(f) for f in sized.pooler_output) != sum(len(f) for f in first.pooler_output)  # really resized
    assert all(torch.equal(a, b) for a, b in zip(first.pooler_output, again.pooler_output))
    assert again.pooler_output[0] is not first.pooler_output[0]  # a fresh copy, not the stored tensor


def test_eviction_keeps_the_cache_under_its_bound_least_recently_used_first(loaded) -> None:
    """Catches a bound that is not enforced, bytes that are not counted, and eviction in the wrong order."""
    model, processor = loaded("llava", "sdpa")
    spec = tiny_vlms.family_of("llava")
    images = [tiny_vlms.make_inputs("llava", processor, seed=seed) for seed in range(4)]
    probe = FeatureCache(64 * MB)
    with probe.attach(model, spec):
        _features(model, "llava", images[0])
    entry = probe.stats().bytes
    assert entry > 0
    cache = FeatureCache(int(2.5 * entry))  # room for two entries
    with cache.attach(model, spec):
        for index in (0, 1, 0, 2, 3):  # 0 is used again before 2 arrives, so 1 goes first, then 0
            _features(model, "llava", images[index])
            assert cache.stats().bytes <= cache.max_bytes
        assert cache.stats().evictions == 2 and cache.stats().entries == 2
        before = cache.stats()
        _features(model, "llava", images[3])  # most recent: kept
        _features(model, "llava", images[1])  # evicted first: computed again
        assert (cache.stats() - before).hits == 1 and (cache.stats() - before).misses == 1
        assert cache.stats().bytes <= cache.max_bytes


def test_with_gradients_or_in_training_mode_calls_pass_through(loaded) -> None:
    """Catches a cache that serves outputs without their autograd graph (training is passed through the same way)."""
    model, processor = loaded("llava", "sdpa")
    spec = tiny_vlms.family_of("llava")
    inputs = tiny_vlms.make_inputs("llava", processor)
    owner = spec.image_features_owner(model)
    cache = FeatureCache(64 * MB)
    with cache.attach(model, spec):
        owner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    assert cache.stats().bypassed == 1 and cache.stats().entries == 0


def test_every_family_names_its_feature_method_and_removal_restores_it(loaded) -> None:
    """Catches a family whose default owner lacks the method, and an attach/remove that leaves the model changed."""
    for family in tiny_vlms.FAMILIES:
        model, _ = loaded(family, "sdpa")
        spec = tiny_vlms.family_of(family)
        owner = spec.image_features_owner(model)
        assert callable(getattr(owner, spec.image_features_method))
        before = dict(vars(owner))
        attached = FeatureCache(MB).attach(model, spec)
        assert spec.image_features_method in vars(owner)
        with pytest.raises(ValueError, match="already wrapped"):
            FeatureCache(MB).attach(model, spec)
        attached.remove()
        attached.remove()
        assert vars(owner).keys() == before.keys()


@pytest.fixture(scope="module")
def llava_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded_ = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded_, load_tasks([TASK], subset_size=4, seed=0)


def test_evaluator_accuracy_is_identical_and_latency_never_uses_the_cache(llava_and_tasks) -> None:
    """Catches a cache that changes answers or kept counts through lmms-eval, one left attached after an evaluation,
    and a latency measurement served from it (its timings must include the vision tower)."""
    loaded_, tasks = llava_and_tasks
    cache = FeatureCache(64 * MB)
    plain = Evaluator(loaded_, tasks, batch_size=3, max_failures=100)
    cached = Evaluator(loaded_, tasks, batch_size=3, max_failures=100, feature_cache=cache)
    off = plain.evaluate(DART)
    cold = cached.evaluate(DART)
    assert (cache.stats().hits, cache.stats().misses) == (0, 2)  # 4 documents in batches of 3 and 1
    with _counting(_vision_tower(loaded_.model)) as calls:
        warm = cached.evaluate(DART)
    assert calls[0] == 0 and (cache.stats().hits, cache.stats().misses) == (2, 2)
    for result in (cold, warm):
        assert result.accuracy == off.accuracy
        assert [(s.doc_index, s.prediction, s.n_kept_vision) for s in result.samples] == \
               [(s.doc_index, s.prediction, s.n_kept_vision) for s in off.samples]
    inputs = latency_inputs(loaded_, tasks[0])  # the first document: its features are in the cache
    before = cache.stats()
    with _counting(_vision_tower(loaded_.model)) as calls:
        measure_latency(loaded_, inputs, {"unpruned": None, "dart": DART}, new_tokens=2, repeats=1, warmup=0)
    assert calls[0] == 2 and cache.stats() == before


def _space(tmp_path: Path, model: Path) -> Path:
    data = {"study": "cache", "model": str(model), "tasks": [TASK], "subset": {"size": 4, "seed": 0},
            "methods": ["dart", "random"], "layer": [1, 2], "keep_ratio": [0.25, 0.5],
            "options": {"dart": {"n_image_pivots": [4], "n_text_pivots": [4]}},
            "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu",
            "batch_size": 4, "max_failures": 100, "sampler": {"name": "random", "seed": 0},
            "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tune_stores_hits_per_trial_and_the_same_numbers_with_the_cache_off(saved_dirs, tmp_path) -> None:
    """Catches a `--feature-cache-mb` that is ignored, counts not stored with the trials or not printed, and a
    study whose accuracies change with the cache."""
    space = _space(tmp_path, saved_dirs["llava"])
    runner = CliRunner()
    studies = {}
    for mb in ("64", "0"):
        storage = f"sqlite:///{tmp_path / f'c{mb}.db'}"
        result = runner.invoke(app, ["tune", "--space", str(space), "--storage", storage, "--trials", "3",
                                     "--feature-cache-mb", mb])
        assert result.exit_code == 0, result.output
        words = " ".join(result.output.split())
        assert ("feature cache of this worker: 2 hits, 1 misses" in words) if mb != "0" else \
            ("feature cache: off" in words)
        studies[mb] = optuna.load_study(study_name="cache", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    on, off = studies["64"], studies["0"]
    assert [t.params for t in on] == [t.params for t in off] and len(on) == 3
    assert [t.user_attrs["samples"] for t in on] == [t.user_attrs["samples"] for t in off]
    assert [(t.user_attrs["feature_cache_hits"], t.user_attrs["feature_cache_misses"]) for t in on] == \
           [(0, 1), (1, 0), (1, 0)]
    assert "feature_cache_hits" not in off[0].user_attrs


def test_the_space_carries_the_cache_size() -> None:
    """Catches a key the schema rejects, a default of off, and a negative size accepted."""
    base = {"model": "m", "tasks": ["t"], "methods": ["dart"], "layer": [2], "keep_ratio": [0.25]}
    assert parse_space(base).feature_cache_mb > 0
    assert parse_space({**base, "feature_cache_mb": 0}).feature_cache_mb == 0
    assert FeatureCache.from_mb(0) is None and FeatureCache.from_mb(1).max_bytes == MB
    with pytest.raises(SpaceError, match="feature_cache_mb"):
        parse_space({**base, "feature_cache_mb": -1})
