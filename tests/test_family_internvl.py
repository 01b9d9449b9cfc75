"""InternVL: tiles split per image, one pool of vision tokens per image, the tokens per tile saved."""

import torch

import tiny_vlms
import tuner
from tuner.evaluation.inputs import build_inputs
from tuner.models import load_model
from tuner.models.families import get_family
from tuner.models.families.internvl import TINY_TOKENS_PER_TILE

FAMILY = "internvl"


def _tiles_per_image(processor, seed: int = 0) -> list[int]:
    """The image processor's own tile counts (`num_patches`) for the test images of a batch of 2."""
    sizes = get_family(FAMILY).tiny_image_sizes
    images = [tiny_vlms._make_image(w, h, seed + row) for row, (w, h) in enumerate(sizes)]
    return list(processor.image_processor(images)["num_patches"])


def test_row_images_takes_each_images_own_tiles(loaded):
    model, processor = loaded(FAMILY, "sdpa")
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=2)
    tiles = _tiles_per_image(processor)
    assert tiles == [3, 5]  # a 2x1 grid and a 2x2 grid, each plus the thumbnail
    starts = [0, tiles[0]]
    for row in range(2):
        alone = get_family(FAMILY).row_images(inputs, row)["pixel_values"]
        assert torch.equal(alone, inputs["pixel_values"][starts[row]:starts[row] + tiles[row]])


def test_all_tiles_of_an_image_are_one_pool(loaded):
    """Quotas are taken over the whole image (not per tile), and evenly spaced picks reach every tile."""
    model, processor = loaded(FAMILY, "sdpa")
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=2)
    tiles = _tiles_per_image(processor)
    vision = inputs["input_ids"] == model.config.image_token_id
    with tuner.apply_pruning(model, tuner.PruningConfig(method="pooling", layer=2, keep_ratio=0.3)) as handle, \
            torch.no_grad():
        model(**inputs)
    stats = handle.requests[0]
    assert stats.n_vision == [n * TINY_TOKENS_PER_TILE for n in tiles]
    assert stats.n_kept_vision == [round(0.3 * n) for n in stats.n_vision]  # 14 and 24; per tile: 15 and 25
    for row in range(2):
        kept = handle.last_kept[row]
        image_positions = vision[row].nonzero().squeeze(1)
        tile_of = torch.searchsorted(image_positions, kept[vision[row, kept]]) // TINY_TOKENS_PER_TILE
        assert set(tile_of.tolist()) == set(range(tiles[row]))


def test_saved_checkpoint_loads_with_its_tokens_per_tile(saved_dirs):
    """`tuner.load_model` rebuilds the image-only processor with the checkpoint's `image_seq_length`."""
    loaded = load_model(saved_dirs[FAMILY], device="cpu")
    assert loaded.family == FAMILY and loaded.processor.image_seq_length == TINY_TOKENS_PER_TILE
    assert loaded.processor.tokenizer.context_image_token == "<IMG_CONTEXT>"
    image = tiny_vlms._make_image(192, 96, 0)
    inputs = build_inputs(loaded, ["What is shown?"], [[image]])
    assert int((inputs["input_ids"] == loaded.model.config.image_token_id).sum()) == 3 * TINY_TOKENS_PER_TILE
    with tuner.apply_pruning(loaded.model, tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.25)) as handle:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert handle.requests[0].n_kept_vision == [12]
