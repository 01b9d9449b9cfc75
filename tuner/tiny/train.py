"""Training the embedded tiny LLaVA from scratch on generated `dart_shapes` scenes (split "train"), seeded.

Each training sequence is one image followed by several question/answer turns, the first of which is exactly
the prompt `dart-tuner eval` sends; the loss is on the answer tokens (and the end-of-turn token) only.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tuner.evaluation import shapes
from tuner.tiny.model import build_model, build_processor, full_prompt
from tuner.tiny.recipe import TinyShape, TrainConfig

IGNORE = -100


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
        self.first_vision = 1  # the image's tokens follow the role tag
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
    input_ids, labels, images, guides = [], [], [], []
    for index in range(start, start + config.batch_size):
        rng = random.Random(f"{shapes.TASK_NAME}/train/{config.seed}/{index}")
        scene = shapes.make_scene(rng)
        ids, lab = list(seqs.prefix), [IGNORE] * len(seqs.prefix)
        guide = []
        for turn in range(config.turns_per_image):
            question, answer = shapes.make_question(rng, scene, shapes.CATEGORIES[(index + turn) % 3])
            prompt = seqs.question(question)
            guide.append((len(ids) + len(prompt) - 1, relevant_patches(scene, question, config.shape)))
            ids += prompt + [seqs.ids(answer), seqs.eos]
            lab += [IGNORE] * len(prompt) + [seqs.ids(answer), seqs.eos]
        input_ids.append(ids)
        labels.append(lab)
        images.append(shapes.render(scene))
        guides.append(guide)
    guide_mask = torch.zeros(len(input_ids), len(input_ids[0]), seqs.n_vision)
    for row, guide in enumerate(guides):
        for position, patches in guide:
            guide_mask[row, position, patches] = 1.0
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": seqs.pixels(images),
            "guide": guide_mask}


_CELL = re.compile(r"row (\d+), column (\d+)")
_COUNT = re.compile(r"How many (\w+) shapes")


def relevant_patches(scene: shapes.Scene, question: str, shape: TinyShape) -> list[int]:
    """Indices of the vision tokens (patches, row-major) that show what `question` asks about: the named cell, or
    every cell holding a shape of the counted colour (none when there is no such shape)."""
    side = shape.image_size // shape.patch_size
    per_cell = side // scene.grid
    if match := _CELL.search(question):
        cells = [(int(match.group(1)) - 1, int(match.group(2)) - 1)]
    elif match := _COUNT.search(question):
        cells = [(item.row, item.col) for item in scene.items if item.color == match.group(1)]
    else:
        raise ValueError(f"no image region for question {question!r}")
    return [(row * per_cell + dr) * side + col * per_cell + dc for row, col in cells
            for dr in range(per_cell) for dc in range(per_cell)]


def guidance_loss(attentions: torch.Tensor, guide: torch.Tensor, first_vision: int) -> torch.Tensor:
    """-log of the attention mass (mean over heads) that each guided question puts on its relevant patches.

    A curriculum aid against the plateau where attention from the question is still uniform over the image and
    the gradient only teaches the answer prior: it points the first full-attention layer at the right patches
    early, and its weight falls to zero, so the final model answers by the ordinary loss alone.
    """
    n_vision = guide.shape[-1]
    to_image = attentions.float().mean(1)[:, :, first_vision:first_vision + n_vision]  # (batch, queries, patches)
    guided = guide.sum(-1) > 0
    mass = (to_image * guide).sum(-1)[guided]
    return -torch.log(mass + 1e-6).mean()


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


def init_vision_positions(model: LlavaForConditionalGeneration, shape: TinyShape) -> None:
    """Fixed 2-D sine/cosine values as the (still trainable) patch position embeddings of the vision tower.

    Half the channels encode the patch row, half its column, at geometrically spaced frequencies, so patches of one
    grid cell start with similar, easily matched positions; from a random start the question's attention has to find
    its cell first, which is where a tiny model spends most of its steps on the answer prior.
    """
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    side, quarter = shape.image_size // shape.patch_size, weight.shape[1] // 4
    frequencies = 1.0 / (side ** (torch.arange(quarter) / quarter))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles_r = rows.flatten()[:, None] * frequencies
    angles_c = cols.flatten()[:, None] * frequencies
    with torch.no_grad():
        weight[1:] = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)
        weight[0] = 0.0  # the class token: no position


def train(config: TrainConfig, out_dir: str | Path | None = None,
          log: Callable[[str], None] | None = None,
          resume: bool = False) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, TrainLog]:
    """Train from scratch (or, with `resume`, from the last evaluated step saved in `out_dir`); save model +
    processor + `training.json` (+ the optimizer state for resuming) to `out_dir` when given."""
    torch.manual_seed(config.seed)
    processor = build_processor(config.shape)
    if config.init_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(config.init_from, dtype=torch.float32)
        if model.config.text_config.vocab_size != len(processor.tokenizer):
            raise ValueError(f"{config.init_from} has a vocabulary of {model.config.text_config.vocab_size} tokens, "
                             f"the tiny tokenizer {len(processor.tokenizer)}: not a tiny-llava-shapes checkpoint")
    else:
        model = build_model(processor.tokenizer, config.shape)
        init_vision_positions(model, config.shape)
    model.train()
    seqs = Sequences(processor, config.shape.n_vision_tokens)
    val_docs = list(shapes.generate_docs("val", config.eval_docs, seed=config.seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    history, first_step = TrainLog(), 0
    if resume:
        first_step, history = _load_state(out_dir, config, model, optimizer, scheduler)
        if log:
            log(f"resuming {out_dir} at step {first_step}/{config.steps}")
    start = time.perf_counter() - history.seconds
    guided_layer = config.shape.local_layers  # the first layer where the question can reach the image
    guiding = None  # whether the model is set up for guidance (eager attention, which returns its weights)
    for step in range(first_step, config.steps):
        batch = training_batch(seqs, config.first_image + step * config.batch_size, config)
        weight = config.guidance * max(0.0, 1 - step / config.guidance_steps) if config.guidance_steps else 0.0
        if guiding != bool(weight):
            guiding = bool(weight)
            model.set_attn_implementation("eager" if guiding else "sdpa")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            output = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           output_attentions=bool(weight))
        answer_loss = F.cross_entropy(output.logits[:, :-1].float().flatten(0, 1),
                                      batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        loss = answer_loss
        if weight:
            loss = loss + weight * guidance_loss(output.attentions[guided_layer], batch["guide"], seqs.first_vision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.losses.append(float(answer_loss.detach()))  # the guidance loss is not logged
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
            if out_dir is not None and done < config.steps:  # a stopped run keeps its last evaluated checkpoint
                history.seconds = elapsed
                save(model, processor, config, history, out_dir)
                _save_state(out_dir, config, done, history, optimizer, scheduler)
                model.train()
    history.seconds = time.perf_counter() - start
    model.eval()
    if out_dir is not None:  # the final checkpoint, written once
        save(model, processor, config, history, out_dir)
        (Path(out_dir) / STATE_FILE).unlink(missing_ok=True)  # finished: nothing to resume, nothing to ship
    return model, processor, history


STATE_FILE = "trainer_state.pt"


def _save_state(out_dir: str | Path, config: TrainConfig, step: int, history: TrainLog,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """What `--resume` needs besides the weights: the step, the log and the optimizer and schedule states."""
    path = Path(out_dir) / STATE_FILE
    torch.save({"config": asdict(config), "step": step, "losses": history.losses,
                "evaluations": history.evaluations, "seconds": history.seconds,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _load_state(out_dir: str | Path | None, config: TrainConfig, model: LlavaForConditionalGeneration,
                optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, TrainLog]:
    """Weights from `out_dir`'s checkpoint and the rest from its state file; refuses a run with other settings."""
    path = Path(out_dir or "") / STATE_FILE
    if out_dir is None or not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist (a run saves it at each evaluation)")
    state = torch.load(path, weights_only=False)
    if state["config"] != asdict(config):
        changed = sorted(key for key, value in asdict(config).items() if state["config"].get(key) != value)
        raise ValueError(f"{path} was saved by a run with other settings ({', '.join(changed)} differ)")
    saved = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], TrainLog(state["losses"], state["evaluations"], state["seconds"])


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
