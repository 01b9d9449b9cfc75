"""Chunked scoring, as early stopping runs it: the same per-document answers and scores as one evaluation, and no
per-chunk clean-up (lmms-eval's default `clean()` ran two full garbage collections per chunk, 0.53 s per chunk
outside generation against 0.02 s without, for the embedded model on a 2-core CPU: `.ci/chunk_cost.py`)."""

from __future__ import annotations

import gc

import pytest

from tuner import PruningConfig
from tuner.evaluation import shapes
from tuner.evaluation.runner import Evaluator

EMBEDDED = "embedded:tiny-llava-shapes"
CONFIG = PruningConfig(method="dart", layer=2, keep_ratio=0.25)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    """The embedded model (it answers, unlike the random test models) on 11 documents."""
    from tuner.evaluation.tasks import load_tasks
    from tuner.models.loading import load_model

    loaded = load_model(EMBEDDED, dtype="float32", device="cpu")
    return Evaluator(loaded, load_tasks([shapes.TASK_NAME], subset_size=11, seed=0), batch_size=4)


def test_chunks_score_the_same_documents_the_same_way_as_one_evaluation(evaluator: Evaluator) -> None:
    """Chunks of 4 (the last of 3) against one run: every document, prediction, score and kept-token count is
    identical, so an early stop decides on exactly the scores the full trial would have stored."""
    whole = evaluator.evaluate(CONFIG)
    chunked = evaluator.evaluate(CONFIG, chunk_size=4)
    key = [(s.doc_index, s.prediction, s.score, s.n_kept_vision) for s in whole.samples]
    assert key == [(s.doc_index, s.prediction, s.score, s.n_kept_vision) for s in chunked.samples]
    assert len(key) == 11 and chunked.stopped is None
    assert chunked.accuracy == pytest.approx(whole.accuracy)


def test_no_chunk_runs_a_garbage_collection_and_the_model_survives(evaluator: Evaluator) -> None:
    """The skipped clean-up is not needed: after chunked evaluations the wrapper still answers with the same model
    (lmms-eval's default drops the wrapper's modules), and no chunk pays for a full collection."""
    collections: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            collections.append(1)

    gc.callbacks.append(count)
    try:
        first = evaluator.evaluate(CONFIG, chunk_size=3)
    finally:
        gc.callbacks.remove(count)
    assert evaluator.lm.loaded.model is not None
    assert first.n_samples == 11 and len(collections) <= 1  # none asked for; at most one the interpreter chose
    again = evaluator.evaluate(None, chunk_size=3)
    assert again.n_samples == 11 and any(s.score for s in again.samples)
