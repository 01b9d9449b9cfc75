"""Training the embedded tiny LLaVA from scratch on generated `dart_shapes` scenes (split "train"), seeded.

Each training sequence is one image followed by several question/answer turns, the first of which is exactly
the prompt `dart-tuner eval` sends; the loss is on the answer tokens (and the end-of-turn token) only.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tuner.evaluation import shapes
from tuner.tiny.model import TinyShape, build_model, build_processor, full_prompt

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (stored next to the checkpoint)."""

    steps: int = 3000
    batch_size: int = 32
    turns_per_image: int = 12
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 250
    eval_docs: int = 300
    shape: TinyShape = field(default_factory=TinyShape)
    init_from: str | None = None  # continue from this checkpoint's weights (a new optimizer and schedule)
    first_image: int = 0  # index of the first training scene; a continued run starts after the images seen


@dataclass
class TrainLog:
    """Loss per step and validation accuracy at each evaluation."""

    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class Sequences:
    """Token ids for prompts and training sequences, built directly from the vocabulary (no text round trip)."""

    def __init__(self, processor: LlavaProcessor, n_vision: int) -> None:
        tokenizer = processor.tokenizer
        self.ids = tokenizer.convert_tokens_to_ids
        self.processor = processor
        self.n_vision = n_vision
        self.prefix = [self.ids("USER:")] + [self.ids("<image>")] * n_vision
        self.eos = tokenizer.eos_token_id

    def question(self, question: str) -> list[int]:
        """The tokens after the image for one question, ending where the answer starts (one compound token)."""
        token = self.ids(full_prompt(question))
        if token == self.processor.tokenizer.unk_token_id:
            raise ValueError(f"question {question!r} is not in the tiny vocabulary")
        return [token]

    def pixels(self, images: list) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]


def training_batch(seqs: Sequences, start: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Images start..start+batch_size-1 of split 'train', each with `turns_per_image` question/answer turns."""
    input_ids, labels, images = [], [], []
    for index in range(start, start + config.batch_size):
        rng = random.Random(f"{shapes.TASK_NAME}/train/{config.seed}/{index}")
        scene = shapes.make_scene(rng)
        ids, lab = list(seqs.prefix), [IGNORE] * len(seqs.prefix)
        for turn in range(config.turns_per_image):
            question, answer = shapes.make_question(rng, scene, shapes.CATEGORIES[(index + turn) % 3])
            prompt = seqs.question(question)
            ids += prompt + [seqs.ids(answer), seqs.eos]
            lab += [IGNORE] * len(prompt) + [seqs.ids(answer), seqs.eos]
        input_ids.append(ids)
        labels.append(lab)
        images.append(shapes.render(scene))
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": seqs.pixels(images)}


def answer_accuracy(model: LlavaForConditionalGeneration, seqs: Sequences, docs: list[dict],
                    batch_size: int = 50) -> float:
    """Exact match of the greedy first answer token on `docs`, with exactly the evaluation prompt."""
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(docs), batch_size):
            chunk = docs[start:start + batch_size]
            ids = torch.tensor([seqs.prefix + seqs.question(d["question"]) for d in chunk])
            logits = model(input_ids=ids, pixel_values=seqs.pixels([shapes.doc_image(d) for d in chunk]),
                           logits_to_keep=1).logits[:, -1]
            targets = torch.tensor([seqs.ids(d["answer"]) for d in chunk])
            correct += int((logits.argmax(-1) == targets).sum())
    model.train()
    return correct / len(docs)


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(config: TrainConfig, out_dir: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, TrainLog]:
    """Train from scratch; save model + processor + `training.json` to `out_dir` when given."""
    torch.manual_seed(config.seed)
    processor = build_processor(config.shape)
    if config.init_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(config.init_from, dtype=torch.float32)
        if model.config.text_config.vocab_size != len(processor.tokenizer):
            raise ValueError(f"{config.init_from} has a vocabulary of {model.config.text_config.vocab_size} tokens, "
                             f"the tiny tokenizer {len(processor.tokenizer)}: not a tiny-llava-shapes checkpoint")
    else:
        model = build_model(processor.tokenizer, config.shape)
    model.train()
    seqs = Sequences(processor, config.shape.n_vision_tokens)
    val_docs = list(shapes.generate_docs("val", config.eval_docs, seed=config.seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    history = TrainLog()
    start = time.perf_counter()
    for step in range(config.steps):
        batch = training_batch(seqs, config.first_image + step * config.batch_size, config)
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.losses.append(float(loss.detach()))
        done = step + 1
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            accuracy = answer_accuracy(model, seqs, val_docs)
            elapsed = time.perf_counter() - start
            recent = history.losses[-config.eval_every:]
            history.evaluations.append({"step": done, "val_accuracy": accuracy, "loss": sum(recent) / len(recent),
                                        "seconds": elapsed})
            if log:
                log(f"step {done}/{config.steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"val accuracy {accuracy:.3f}  {elapsed:.0f} s")
            if out_dir is not None:  # a long run that is stopped keeps its latest evaluated checkpoint
                history.seconds = elapsed
                save(model, processor, config, history, out_dir)
                model.train()
    history.seconds = time.perf_counter() - start
    model.eval()
    if out_dir is not None:
        save(model, processor, config, history, out_dir)
    return model, processor, history


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, config: TrainConfig, history: TrainLog,
         out_dir: str | Path) -> Path:
    """Write the checkpoint (safetensors + processor) and how it was trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"train_config": asdict(config), "final_val_accuracy": (history.evaluations or [{}])[-1].get(
        "val_accuracy"), "seconds": history.seconds, "evaluations": history.evaluations,
        "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return out
