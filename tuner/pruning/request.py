"""Per-request state of the pruning hooks: what a prompt holds, what it kept, and whether a call continues it.

A request is one `generate()` call, or one forward outside generate. `generate(use_cache=False)` (Idefics3 and
SmolVLM configs ask for it) runs every step as a fresh prefill of the grown sequence; inside one generate call
(`GenerateCalls`), such a forward continues the call's request when it holds the same rows, the same prompt and
padding as its first columns and the same image inputs. It reuses the request's choice (the vision positions each
stage kept, and any new states), so the answer is the one a cached generate gives. Outside generate nothing is
reused: a forward whose prompt extends the last one's (a multiple-choice option, a hand-written recompute loop) is
a new request, pruned on its own text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tuner.pruning.base import PromptInputs, PruningMethod, Selection

# Per-token (or cache) keyword arguments: they grow with the sequence, so they do not identify the images.
SEQUENCE_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "cache_position", "inputs_embeds",
                             "token_type_ids", "mm_token_type_ids", "labels", "past_key_values", "cache"})


@dataclass(frozen=True)
class RequestStats:
    """Token counts of one request, per row (padding excluded); later steps of the request add nothing.

    `n_kept_vision` is what the last stage kept; `stage_kept_vision[j]` what stage j kept (one entry per stage).
    `pruned` is False for a request passed through unpruned: its attention mask hides every vision token.
    """

    n_tokens: list[int]
    n_vision: list[int]
    n_kept_vision: list[int]
    stage_kept_vision: list[list[int]] = field(default_factory=list)
    select_ms: float = 0.0  # wall time of the methods' selections in this prefill, all stages (device synchronised)
    pruned: bool = True

    @classmethod
    def unpruned(cls, attention: torch.Tensor, n_stages: int) -> RequestStats:
        """A request passed through unpruned (its mask [B, N] hides every vision token)."""
        zeros = [0] * attention.shape[0]
        return cls(n_tokens=attention.sum(1).tolist(), n_vision=zeros, n_kept_vision=zeros,
                   stage_kept_vision=[zeros for _ in range(n_stages)], pruned=False)

    def with_stage(self, kept_vision: list[int], select_ms: float) -> RequestStats:
        """These stats extended by a later stage that kept `kept_vision` per row in `select_ms`."""
        return replace(self, n_kept_vision=kept_vision, select_ms=self.select_ms + select_ms,
                       stage_kept_vision=[*self.stage_kept_vision, kept_vision])

    @property
    def n_kept(self) -> list[int]:
        """All tokens kept per row after the last stage: every non-vision token plus the kept vision tokens."""
        return [t - v + k for t, v, k in zip(self.n_tokens, self.n_vision, self.n_kept_vision)]

    @property
    def stage_n_kept(self) -> list[list[int]]:
        """All tokens each stage's layers hold per row: `n_kept` after every stage, first to last."""
        return [[t - v + k for t, v, k in zip(self.n_tokens, self.n_vision, kept)] for kept in self.stage_kept_vision]


@dataclass
class Prompt:
    """What the top-level hook saw for the current prefill; `choice` is set when it continues a request."""

    input_ids: torch.Tensor  # [B, N]
    vision: torch.Tensor  # [B, N] bool, padding excluded
    attention: torch.Tensor  # [B, N] bool
    n_vision: list[int]  # per row
    state: Any = None  # the family's per-token extras (Family.prompt_state)
    grids: Any = None  # the family's image grids (Family.image_grids), if the method needs them
    embeddings: torch.Tensor | None = None  # [B, N, D] layer 0's input, if a method needs it
    choice: RequestChoice | None = None  # the request this call continues (None: a new request)

    def inputs_for(self, method: PruningMethod) -> PromptInputs | None:
        """The whole prompt's layer 0 input for a method that reads it (None otherwise)."""
        if not method.needs.prompt_inputs:
            return None
        if self.embeddings is None or self.embeddings.shape[:2] != self.attention.shape:
            raise RuntimeError(f"method {method.config.method!r} needs layer 0's input, which this prefill did not "
                               "pass through decoder layer 0")
        return PromptInputs(self.embeddings, self.vision, self.attention)


@dataclass
class RequestChoice:
    """A request's prompt and what each stage kept, in original positions, for the calls that continue it."""

    input_ids: torch.Tensor  # [B, P]
    attention: torch.Tensor  # [B, P] bool
    vision: torch.Tensor  # [B, P] bool
    images: dict[str, torch.Tensor]
    generate_call: int | None = None  # the generate() call it began in (None: a forward outside generate)
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per stage, per row: kept vision positions
    new_states: list[list[torch.Tensor] | None] = field(default_factory=list)  # per stage, aligned with `kept`

    @classmethod
    def begin(cls, input_ids: torch.Tensor, attention: torch.Tensor, vision: torch.Tensor, kwargs: dict,
              generate_call: int | None) -> RequestChoice:
        """A new request: the prompt of a full forward made with keyword arguments `kwargs`, in generate call
        `generate_call` (None: outside generate); its stages' choices are noted as they select."""
        return cls(input_ids, attention, vision, image_inputs(kwargs), generate_call)

    def continued_by(self, input_ids: torch.Tensor, attention: torch.Tensor, kwargs: dict,
                     generate_call: int | None) -> bool:
        """Whether a full forward of `input_ids`, made in generate call `generate_call` (None: outside generate), is
        a later step of this request: the same generate call, its prompt grown at the end, the same images."""
        if self.generate_call is None or generate_call != self.generate_call:
            return False
        rows, length = self.input_ids.shape
        if input_ids.shape[0] != rows or input_ids.shape[1] <= length or input_ids.device != self.input_ids.device:
            return False
        if not (torch.equal(input_ids[:, :length], self.input_ids) and torch.equal(attention[:, :length],
                                                                                      self.attention)):
            return False
        images = image_inputs(kwargs)
        return images.keys() == self.images.keys() and all(_same(images[k], self.images[k]) for k in images)

    def remember(self, stage: int, kept: list[torch.Tensor], new_states: list[torch.Tensor] | None) -> None:
        """Note what stage `stage` kept (original vision positions per row, ascending) and any new states."""
        self.kept[stage:] = [kept]
        self.new_states[stage:] = [new_states]

    def selection(self, stage: int, positions: torch.Tensor, vision: torch.Tensor) -> Selection:
        """Stage `stage`'s choice in the slots of this call: `positions` [B, W] the original position of each
        slot, `vision` [B, W] its vision slots."""
        kept = []
        for row, original in enumerate(self.kept[stage]):
            slots = (vision[row] & torch.isin(positions[row], original)).nonzero().squeeze(1)
            if slots.numel() != original.numel():
                raise RuntimeError(f"a continued request lost kept vision tokens of row {row} at stage {stage}")
            kept.append(slots)
        return Selection(kept, self.new_states[stage])

    def extend(self, input_ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(vision [B, N] of a continuing call: the prompt's, none among the new tokens; vision count per row)."""
        vision = torch.zeros_like(attention)
        vision[:, :self.vision.shape[1]] = self.vision
        return vision, self.vision.sum(1).tolist()


def note_stage(requests: list[RequestStats], stage: int, prompt: Prompt, kept_vision: list[int],
               select_ms: float) -> None:
    """Record a new request's stage `stage` (kept vision tokens per row): stage 0 appends its stats, a later stage
    extends the last ones."""
    if stage == 0:
        requests.append(RequestStats(n_tokens=prompt.attention.sum(1).tolist(), n_vision=prompt.n_vision,
                                     n_kept_vision=kept_vision, stage_kept_vision=[kept_vision], select_ms=select_ms))
    else:
        requests[-1] = requests[-1].with_stage(kept_vision, select_ms)


class GenerateCalls:
    """Tells one `generate()` call of a model from another: while attached, the model instance's `generate` is this
    object, which numbers each call and runs the model's own generate; `remove()` restores the instance as it was.

    An instance attribute rather than a copied method, so the class and every other instance are untouched.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._previous = vars(model).get("generate")  # an instance attribute someone set before us, if any
        self._generate = getattr(model, "generate", None)
        self._calls: list[int] = []  # the running calls, innermost last (a generate may nest another)
        self._count = 0
        if callable(self._generate):  # a bare module without generate: every forward is its own request
            functools.update_wrapper(self, self._generate, updated=())  # its name, docs and signature
            model.generate = self

    @property
    def current(self) -> int | None:
        """The number of the innermost generate call now running (None: outside generate)."""
        return self._calls[-1] if self._calls else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._count += 1
        self._calls.append(self._count)
        try:
            return self._generate(*args, **kwargs)
        finally:
            self._calls.pop()

    def remove(self) -> None:
        """Give the instance back its own `generate` (idempotent; a wrapper set over this one later stays)."""
        if vars(self._model).get("generate") is not self:
            return
        if self._previous is None:
            del self._model.generate
        else:
            self._model.generate = self._previous


def image_inputs(kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensor keyword arguments of a model call that are not per token: its images (pixels, sizes, grids)."""
    return {name: value for name, value in kwargs.items()
            if isinstance(value, torch.Tensor) and name not in SEQUENCE_KWARGS}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))


def padding_from_prebuilt_mask(mask: Any, length: int) -> torch.Tensor | None:
    """The [B, N] padding mask behind a prebuilt 4D prefill mask (generate builds one for static caches).

    Under left padding the last query is a real token, and its causal row attends exactly to the
    non-padding prompt tokens.
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    last_row = mask[:, 0, -1, :length]
    return last_row if last_row.dtype == torch.bool else last_row == 0
