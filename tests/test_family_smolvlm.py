"""SmolVLM: the image-only processor loads without torchvision or num2words, and takes one image list per prompt."""

import tiny_vlms
import tuner
from tuner.evaluation.inputs import build_inputs
from tuner.models import load_model
from tuner.models.families.idefics3 import TINY_IMAGE_SEQ_LEN
from tuner.models.families.smolvlm import ImageOnlySmolVLMProcessor

FAMILY = "smolvlm"


def test_saved_checkpoint_loads_and_batches_one_image_list_per_prompt(saved_dirs):
    loaded = load_model(saved_dirs[FAMILY], device="cpu")
    assert loaded.family == FAMILY and isinstance(loaded.processor, ImageOnlySmolVLMProcessor)
    assert loaded.processor.image_seq_len == TINY_IMAGE_SEQ_LEN
    images = [[tiny_vlms._make_image(128, 64, 0)], [tiny_vlms._make_image(60, 90, 1)]]
    inputs = build_inputs(loaded, ["What is shown?", "Describe it."], images)
    image_tokens = (inputs["input_ids"] == loaded.model.config.image_token_id).sum(1).tolist()
    assert image_tokens == [3 * TINY_IMAGE_SEQ_LEN, 5 * TINY_IMAGE_SEQ_LEN]
    with tuner.apply_pruning(loaded.model, tuner.PruningConfig(method="dart", layer=2, keep_ratio=0.25)) as handle:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    assert handle.requests[0].n_kept_vision == [12, 20]
