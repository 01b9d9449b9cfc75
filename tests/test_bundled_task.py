"""The bundled dart_shapes task (data, images, answers, scoring) and the stratified subsets cut for tuning."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tuner.evaluation import shapes
from tuner.evaluation.tasks import BUNDLED_TASKS_DIR, stratified_indices

DATA = BUNDLED_TASKS_DIR / "dart_shapes" / "data" / "test.jsonl"


def _docs() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def test_shipped_data_is_what_the_generator_makes() -> None:
    """The committed JSONL must be reproducible from the seed (a hand edit or generator drift would break it)."""
    assert _docs() == list(shapes.generate_docs("test", shapes.TEST_SIZE))


def test_every_answer_follows_from_the_scene() -> None:
    """Answers recomputed independently from each scene: a wrong row/column convention or count would show."""
    for doc in _docs():
        scene = shapes.Scene.from_json(doc["scene"], doc["grid"])
        words = doc["question"].rstrip("?").split()
        if doc["category"] == "count":
            expected = str(sum(item.color == words[2] for item in scene.items))
        else:
            row, col = int(words[-3].rstrip(",")) - 1, int(words[-1]) - 1
            item = scene.at(row, col)
            expected = shapes.NONE_ANSWER if item is None else getattr(item, doc["category"])
        assert doc["answer"] == expected, doc


def test_categories_are_balanced_and_answers_varied() -> None:
    """Stratification needs the category field; a degenerate answer set would make accuracy meaningless."""
    docs = _docs()
    assert Counter(d["category"] for d in docs) == {c: shapes.TEST_SIZE // 3 for c in shapes.CATEGORIES}
    for category in ("color", "shape"):
        answers = Counter(d["answer"] for d in docs if d["category"] == category)
        assert max(answers.values()) < 0.35 * sum(answers.values()), answers
    assert len({d["id"] for d in docs}) == len(docs)


def test_render_puts_each_shape_in_its_cell() -> None:
    """The pixel at a cell's centre has the item's colour; empty cells are background (row/col not swapped)."""
    rng = random.Random(3)
    for _ in range(20):
        scene = shapes.make_scene(rng)
        image = shapes.render(scene, 192)
        cell = 192 / scene.grid
        for row in range(scene.grid):
            for col in range(scene.grid):
                # a little below the centre: inside circles, squares and triangles alike
                pixel = image.getpixel((int((col + 0.5) * cell), int((row + 0.6) * cell)))
                item = scene.at(row, col)
                assert pixel == (shapes.COLORS[item.color] if item else shapes.BACKGROUND), (row, col, item)


def test_shapes_differ_where_they_should() -> None:
    """Circle, square and triangle must differ in pixels near the cell corners, or shape questions are unanswerable."""
    corner = {}
    for kind in shapes.SHAPES:
        image = shapes.render(shapes.Scene((shapes.Item(0, 0, kind, "red"),)), 192)
        corner[kind] = (image.getpixel((9, 9)), image.getpixel((9, 39)))  # top-left and bottom-left corners
    red, background = shapes.COLORS["red"], shapes.BACKGROUND
    assert corner == {"square": (red, red), "circle": (background, background), "triangle": (background, red)}


def test_docs_are_seeded_per_index() -> None:
    """A document depends only on (split, seed, index): the train split never repeats the test split."""
    assert shapes.make_doc("test", 7) == shapes.make_doc("test", 7)
    assert shapes.make_doc("test", 7) != shapes.make_doc("train", 7)
    assert shapes.make_doc("test", 7, seed=1) != shapes.make_doc("test", 7)


@pytest.mark.parametrize(("reply", "expected"), [
    ("Red", "red"), ("red.", "red"), (" The circle.", "circle"), ("three", "3"), ("3 shapes", "3"),
    ("None", "none"), ("", ""), ("!!", ""), ("a triangle", "triangle"),
])
def test_normalize_answer(reply: str, expected: str) -> None:
    """Scoring must accept the usual ways a model phrases a one-word answer."""
    assert shapes.normalize_answer(reply) == expected


def test_task_hooks_score_exact_match() -> None:
    """utils.py (loaded by lmms-eval by path) renders the doc's image and scores normalised exact match."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dart_shapes_utils", Path(DATA).parents[1] / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = _docs()[1]
    (image,) = utils.doc_to_visual(doc)
    assert image.size == (doc["image_size"], doc["image_size"])
    assert doc["question"] in utils.doc_to_text(doc, {"pre_prompt": "", "post_prompt": "!"})
    assert utils.process_results(doc, [doc["answer"].upper() + "."]) == {"exact_match": 1.0}
    assert utils.process_results(doc, ["zebra"]) == {"exact_match": 0.0}


def test_stratified_subset_is_proportional_and_seeded() -> None:
    """Each category gets its share (a prefix --limit would take one category only); same seed, same subset."""
    categories = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    subset = stratified_indices(categories, 100, seed=0)
    assert subset == sorted(set(subset)) and len(subset) == 100
    assert Counter(categories[i] for i in subset) == {"a": 50, "b": 30, "c": 20}
    assert stratified_indices(categories, 100, seed=0) == subset
    assert stratified_indices(categories, 100, seed=1) != subset


def test_stratified_subset_edge_cases() -> None:
    """Small subsets still cover every category; sizes at or above the total keep everything; bad size fails."""
    categories = ["a"] * 98 + ["b", "c"]
    small = stratified_indices(categories, 3, seed=5)
    assert sorted(categories[i] for i in small) == ["a", "b", "c"]
    assert len(stratified_indices(categories, 2, seed=5)) == 2
    assert stratified_indices(categories, None, seed=0) == list(range(100))
    assert stratified_indices(categories, 1000, seed=0) == list(range(100))
    assert len(stratified_indices([None] * 10, 4, seed=0)) == 4
    with pytest.raises(ValueError, match="subset size"):
        stratified_indices(categories, 0, seed=0)
