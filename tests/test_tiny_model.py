"""The embedded tiny LLaVA: its vocabulary covers the task, training and evaluation see the same tokens, training
lowers the loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tuner.evaluation import shapes
from tuner.models import load_model
from tuner.models.prompts import build_prompt
from tuner.tiny.model import POST_PROMPT, TinyShape, build_processor
from tuner.tiny.train import STATE_FILE, Sequences, TrainConfig, train, training_batch

N_VISION = TinyShape().n_vision_tokens


def test_every_task_question_and_answer_is_one_known_token() -> None:
    """An unknown question would become <unk> and be unanswerable; an answer split in two could not be scored."""
    tokenizer = build_processor().tokenizer
    docs = list(shapes.generate_docs("test", shapes.TEST_SIZE))
    for text in {d["question"] for d in docs} | {d["answer"] for d in docs}:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, text


def test_evaluation_prompt_is_the_training_prompt(tmp_path: Path) -> None:
    """The prompt `dart-tuner eval` builds (chat template + processor) must tokenize exactly like training's
    first turn, or the trained model is evaluated on inputs it never saw."""
    processor = build_processor()
    doc = shapes.make_doc("test", 4)
    prompt = build_prompt(processor, "llava", doc["question"] + POST_PROMPT, 1)
    inputs = processor(text=[prompt], images=[shapes.doc_image(doc)], return_tensors="pt")
    seqs = Sequences(processor, N_VISION)
    assert inputs["input_ids"][0].tolist() == seqs.prefix + seqs.question(doc["question"])
    assert torch.equal(inputs["pixel_values"], seqs.pixels([shapes.doc_image(doc)]))


def test_training_batch_labels_only_answers() -> None:
    """Loss on prompt tokens would teach the model to predict questions; every turn's answer must be labelled."""
    processor = build_processor()
    seqs = Sequences(processor, N_VISION)
    config = TrainConfig(batch_size=2, turns_per_image=3)
    batch = training_batch(seqs, 0, config)
    labels = batch["labels"][0]
    labelled = labels[labels != -100].tolist()
    assert len(labelled) == 2 * config.turns_per_image  # answer + end of turn, per turn
    answers = {processor.tokenizer.convert_tokens_to_ids(w) for w in
               [*shapes.COLORS, *shapes.SHAPES, shapes.NONE_ANSWER, *map(str, range(17))]}
    assert set(labelled[0::2]) <= answers and set(labelled[1::2]) == {processor.tokenizer.eos_token_id}
    assert torch.equal(batch["input_ids"][0][labels != -100], labels[labels != -100])


def test_a_few_training_steps_lower_the_loss_and_save_a_loadable_checkpoint(tmp_path: Path) -> None:
    """The training command's loop must learn (loss down) and write a checkpoint the ordinary loader reads."""
    config = TrainConfig(steps=12, batch_size=4, turns_per_image=6, warmup_steps=2, eval_every=12, eval_docs=10)
    _, _, history = train(config, out_dir=tmp_path / "ckpt")
    first, last = sum(history.losses[:3]) / 3, sum(history.losses[-3:]) / 3
    assert last < first - 0.5, history.losses
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.family == "llava" and len(loaded.adapter.layers) == config.shape.text_layers
    assert (tmp_path / "ckpt" / "training.json").exists()
    assert not (tmp_path / "ckpt" / STATE_FILE).exists()  # a finished run leaves nothing to resume (or to ship)


class _Stop(Exception):
    pass


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """`train-tiny --resume` after a stop must continue the same run (optimizer, schedule, data order), not restart
    it or change it: the resumed weights equal those of an uninterrupted run."""
    config = TrainConfig(steps=4, batch_size=2, turns_per_image=2, warmup_steps=1, eval_every=2, eval_docs=4)
    whole, _, _ = train(config)

    def stop_at_second_evaluation(message: str) -> None:
        if message.startswith("step 4/"):
            raise _Stop

    with pytest.raises(_Stop):
        train(config, out_dir=tmp_path, log=stop_at_second_evaluation)
    assert (tmp_path / STATE_FILE).exists()
    resumed, _, history = train(config, out_dir=tmp_path, resume=True)
    assert [e["step"] for e in history.evaluations] == [2, 4] and len(history.losses) == 4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(_Stop):  # stop the same run again, then resume it with another learning rate
        train(config, out_dir=tmp_path / "again", log=stop_at_second_evaluation)
    with pytest.raises(ValueError, match="lr differ"):
        train(dataclasses.replace(config, lr=config.lr / 2), out_dir=tmp_path / "again", resume=True)


# The shipped checkpoint, checked on a stratified held-out sample of the test split (not seen in training). On all
# 600 test questions it scores 0.937 unpruned and 0.253 with random keep 0.1 at K=2 (docs/evaluation.md, "The embedded
# model").
# The floors leave room for the sample: 90 questions put a standard error of about 0.03 on the unpruned accuracy
# and about 0.06 on the paired drop, so a drop of at least 0.3 fails only for a model that pruning does not hurt.
EMBEDDED = "embedded:tiny-llava-shapes"
SAMPLE = 90
UNPRUNED_FLOOR = 0.85
MIN_RANDOM_DROP = 0.30


@pytest.fixture(scope="module")
def shipped_eval():
    """The embedded model and an evaluator on the held-out sample, loaded once."""
    from tuner.evaluation.runner import Evaluator
    from tuner.evaluation.tasks import load_tasks

    loaded = load_model(EMBEDDED, dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, Evaluator(loaded, load_tasks([shapes.TASK_NAME], subset_size=SAMPLE, seed=0), batch_size=30)


def test_shipped_checkpoint_loads_offline_through_the_auto_classes() -> None:
    """Users load the embedded model like any hub checkpoint; nothing may need the network."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuner.models.loading import resolve_embedded

    folder = resolve_embedded(EMBEDDED)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert model.config.model_type == "llava" and model.config.text_config.num_hidden_layers == TinyShape().text_layers
    doc = shapes.make_doc("test", 0)
    inputs = processor(text=[build_prompt(processor, "llava", doc["question"] + POST_PROMPT, 1)],
                       images=[shapes.doc_image(doc)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_VISION
    assert processor.tokenizer.get_vocab() == build_processor().tokenizer.get_vocab()  # training's vocabulary


def test_shipped_checkpoint_meets_its_floor_and_pruning_hurts_it(shipped_eval) -> None:
    """Through the evaluation path the demo uses: unpruned at least the floor; random pruning at K=2 keeping 10%
    really keeps 26 of 256 vision tokens for every sample and costs at least MIN_RANDOM_DROP, so the demo's
    Pareto front is a trade-off and not noise."""
    from tuner import PruningConfig

    _, evaluator = shipped_eval
    unpruned = evaluator.evaluate(None)
    pruned = evaluator.evaluate(PruningConfig(method="random", layer=2, keep_ratio=0.1))
    assert unpruned.accuracy >= UNPRUNED_FLOOR, unpruned.accuracy_by_category()
    assert {s.n_kept_vision for s in unpruned.samples} == {N_VISION}
    assert {s.n_kept_vision for s in pruned.samples} == {round(0.1 * N_VISION)}
    assert pruned.accuracy <= unpruned.accuracy - MIN_RANDOM_DROP, (unpruned.accuracy, pruned.accuracy)


def test_guidance_targets_are_the_patches_that_show_the_answer() -> None:
    """The attention-guidance loss points each question at `relevant_patches`: for a cell question they must be
    exactly the pixels of that cell (a row/column swap or an off-by-one would teach attention the wrong place)."""
    import numpy as np

    from tuner.tiny.train import relevant_patches

    shape = TinyShape()
    side = shape.image_size // shape.patch_size
    scene = shapes.Scene((shapes.Item(0, 3, "square", "red"), shapes.Item(2, 1, "circle", "blue")))
    pixels = np.asarray(shapes.render(scene, shape.image_size)).astype(float)
    patches = pixels.reshape(side, shape.patch_size, side, shape.patch_size, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(side * side, -1, 3)

    def colour_pixels(indices: list[int]) -> np.ndarray:
        return (np.abs(patches[indices] - shapes.BACKGROUND).sum(-1) > 60).sum()

    red_square = relevant_patches(scene, "What color is the shape in row 1, column 4?", shape)
    assert len(red_square) == (side // scene.grid) ** 2
    assert colour_pixels(red_square) > 0.4 * len(red_square) * shape.patch_size ** 2  # the square fills ~49%
    assert colour_pixels(relevant_patches(scene, "What shape is in row 4, column 1?", shape)) == 0
    everything = colour_pixels(list(range(side * side)))
    blue = relevant_patches(scene, "How many blue shapes are there?", shape)
    assert colour_pixels(red_square) + colour_pixels(blue) == everything
    assert relevant_patches(scene, "How many green shapes are there?", shape) == []
