"""The bundled offline task: coloured shapes on a grid, drawn with PIL from a seed, with one-word answers.

Every question needs a specific region of the image (the cell a question names, or every shape of one colour),
so dropping the wrong vision tokens costs accuracy. A document stores its scene, not its pixels: the image is
redrawn from the scene when the task asks for it, so the data file is small and nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

TASK_NAME = "dart_shapes"
GRID = 4  # cells per side
IMAGE_SIZE = 192  # pixels per side; processors resize to their own input size
BACKGROUND = (245, 245, 245)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("color", "shape", "count")
NONE_ANSWER = "none"
MIN_ITEMS, MAX_ITEMS = 3, 7
TEST_SIZE = 600  # documents in the shipped test split
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9"}


@dataclass(frozen=True)
class Item:
    """One shape: its cell (0-based row from the top, column from the left), kind and colour."""

    row: int
    col: int
    shape: str
    color: str


@dataclass(frozen=True)
class Scene:
    """Shapes in distinct cells of a `grid` x `grid` board."""

    items: tuple[Item, ...]
    grid: int = GRID

    def at(self, row: int, col: int) -> Item | None:
        return next((item for item in self.items if (item.row, item.col) == (row, col)), None)

    def to_json(self) -> list[list]:
        return [[item.row, item.col, item.shape, item.color] for item in self.items]

    @classmethod
    def from_json(cls, items: list[list], grid: int = GRID) -> Scene:
        return cls(tuple(Item(int(r), int(c), str(s), str(k)) for r, c, s, k in items), grid)


def make_scene(rng: random.Random, grid: int = GRID) -> Scene:
    """A random scene: MIN_ITEMS..MAX_ITEMS shapes in distinct cells."""
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], rng.randint(MIN_ITEMS, MAX_ITEMS))
    return Scene(tuple(Item(r, c, rng.choice(SHAPES), rng.choice(list(COLORS))) for r, c in sorted(cells)), grid)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene: each shape fills the middle ~70% of its cell."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / scene.grid
    margin = 0.15 * cell
    for item in scene.items:
        x0, y0 = item.col * cell + margin, item.row * cell + margin
        x1, y1 = (item.col + 1) * cell - margin, (item.row + 1) * cell - margin
        fill = COLORS[item.color]
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif item.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {item.shape!r}; expected one of {SHAPES}")
    return image


def make_question(rng: random.Random, scene: Scene, category: str) -> tuple[str, str]:
    """(question, answer) of one category; cell questions name an occupied cell four times in five."""
    if category in ("color", "shape"):
        occupied = [(item.row, item.col) for item in scene.items]
        empty = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if (r, c) not in occupied]
        row, col = rng.choice(occupied if rng.random() < 0.8 or not empty else empty)
        item = scene.at(row, col)
        where = f"in row {row + 1}, column {col + 1}"
        if category == "color":
            return f"What color is the shape {where}?", item.color if item else NONE_ANSWER
        return f"What shape is {where}?", item.shape if item else NONE_ANSWER
    if category == "count":
        present = sorted({item.color for item in scene.items})
        color = rng.choice(present if rng.random() < 0.8 else list(COLORS))
        return f"How many {color} shapes are there?", str(sum(item.color == color for item in scene.items))
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def make_doc(split: str, index: int, seed: int = 0) -> dict:
    """Document `index` of `split`: seeded by (split, seed, index) alone, categories in rotation."""
    rng = random.Random(f"{TASK_NAME}/{split}/{seed}/{index}")
    scene = make_scene(rng)
    category = CATEGORIES[index % len(CATEGORIES)]
    question, answer = make_question(rng, scene, category)
    return {"id": f"{split}-{index:05d}", "category": category, "question": question, "answer": answer,
            "grid": scene.grid, "image_size": IMAGE_SIZE, "scene": scene.to_json()}


def generate_docs(split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Documents start..start+n-1 of `split` (the training command draws from split 'train')."""
    for index in range(start, start + n):
        yield make_doc(split, index, seed)


def doc_image(doc: dict) -> Image.Image:
    """The document's image, redrawn from its scene."""
    return render(Scene.from_json(doc["scene"], doc["grid"]), doc["image_size"])


def normalize_answer(text: str) -> str:
    """First word of a reply after any article, lower-case, without punctuation; number words become digits."""
    words = [word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in ("a", "an", "the")]
    if not words:
        return ""
    return _NUMBER_WORDS.get(words[0], words[0])
