"""The embedded tiny LLaVA: its vocabulary covers the task, training and evaluation see the same tokens, training
lowers the loss."""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.evaluation import shapes
from tuner.models import load_model
from tuner.models.prompts import build_prompt
from tuner.tiny.model import POST_PROMPT, build_processor
from tuner.tiny.train import Sequences, TrainConfig, train, training_batch


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
    seqs = Sequences(processor, 144)
    assert inputs["input_ids"][0].tolist() == seqs.prefix + seqs.question(doc["question"])
    assert torch.equal(inputs["pixel_values"], seqs.pixels([shapes.doc_image(doc)]))


def test_training_batch_labels_only_answers() -> None:
    """Loss on prompt tokens would teach the model to predict questions; every turn's answer must be labelled."""
    processor = build_processor()
    seqs = Sequences(processor, 144)
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
