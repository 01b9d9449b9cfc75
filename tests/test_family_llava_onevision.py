"""LLaVA-OneVision: base crop, unpadded (and downsampled) tiles and row newlines are one pool; settings are saved."""

import torch

import tiny_vlms
import tuner
from tuner.evaluation.inputs import build_inputs
from tuner.models import load_model
from tuner.models.families.llava_onevision import TINY_ASPECT_RATIO

FAMILY = "llava_onevision"


def test_pool_is_the_base_crop_the_tiles_and_their_newlines(loaded):
    model, processor = loaded(FAMILY, "sdpa")
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=2)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"]).pooler_output
    # Row 0: 16 base + 4x8 unpadded tile features + 4 newlines; row 1: 8x8 tile features downsampled to 5x5 (more
    # than anyres_max_2 allows) + 5 newlines.
    assert [len(f) for f in features] == [16 + 32 + 4, 16 + 25 + 5]
    newline = model.model.image_newline
    assert [int((f == newline).all(-1).sum()) for f in features] == [4, 5]
    with tuner.apply_pruning(model, tuner.PruningConfig(method="pooling", layer=2, keep_ratio=0.3)) as handle, \
            torch.no_grad():
        model(**inputs)
    assert handle.requests[0].n_vision == [len(f) for f in features]
    assert handle.requests[0].n_kept_vision == [round(0.3 * len(f)) for f in features]


def test_saved_checkpoint_loads_with_its_processor_settings(saved_dirs):
    """`tuner.load_model` rebuilds the image-only processor with the checkpoint's tokens per crop and anyres cap."""
    loaded = load_model(saved_dirs[FAMILY], device="cpu")
    processor = loaded.processor
    assert loaded.family == FAMILY
    assert (processor.num_image_tokens, processor.vision_aspect_ratio, processor.vision_feature_select_strategy) == \
        (16, TINY_ASPECT_RATIO, "full")
    image = tiny_vlms._make_image(112, 112, 0)
    inputs = build_inputs(loaded, ["What is shown?"], [[image]])
    assert int((inputs["input_ids"] == loaded.model.config.image_token_id).sum()) == 46
    with tuner.apply_pruning(loaded.model, tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.25)) as handle:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert handle.requests[0].n_kept_vision == [12]
