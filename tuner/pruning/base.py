"""The one interface every pruning method implements, and what it is given to choose from."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tuner.config.options import Option, PaperSetting, resolve_options

if TYPE_CHECKING:
    from tuner.config import PruningConfig
    from tuner.models.families.grids import ImageGrids


@dataclass(frozen=True)
class PromptInputs:
    """The whole prompt as decoder layer 0 received it, in original positions (before any stage pruned)."""

    embeddings: torch.Tensor  # [B, N0, D] the hidden states entering layer 0 (the text model's input embeddings)
    vision_mask: torch.Tensor  # [B, N0] bool, True on (non-padding) vision tokens
    attention_mask: torch.Tensor  # [B, N0] bool, False on padding


@dataclass
class SelectionContext:
    """Everything a method may look at when it chooses, taken at the input of its stage's layer K during prefill.

    At a later stage of a schedule every tensor covers the tokens the previous stage kept, in the left-padded
    slots layer K receives (N is then that width; `attention_mask` is False on the padding slots).
    """

    hidden_states: torch.Tensor  # [B, N, D] output of layer K-1
    vision_mask: torch.Tensor  # [B, N] bool, True on (non-padding) vision tokens
    attention_mask: torch.Tensor  # [B, N] bool, False on padding
    input_ids: torch.Tensor  # [B, N]
    budgets: list[int]  # vision tokens to keep per row, from keep_ratio / budget
    final_norm: torch.nn.Module  # the text model's final norm (DART measures duplication after it)
    keys: torch.Tensor | None = None  # [B, N, H*d] layer K-1 keys after RoPE, if the method asked
    last_row_attention: torch.Tensor | None = None  # [B, H, N] layer K-1 attention of the last token
    image_grids: list[ImageGrids] | None = None  # per row, its images as 2-D grids of positions, if asked
    vision_saliency: torch.Tensor | None = None  # [B, N] vision-tower attention per vision token, if asked
    vision_keys: torch.Tensor | None = None  # [B, N, d] vision-tower keys (mean over heads) per vision token, if asked
    # (row, query slots [R]) -> [H, R, N]: layer K-1 attention of any query rows, if the method asked
    attention_rows: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    prompt: PromptInputs | None = None  # the layer 0 input of the whole prompt, if the method asked
    positions: torch.Tensor | None = None  # [B, N] original prompt position of every slot (None: 0..N-1)

    def original_positions(self) -> torch.Tensor:
        """[B, N] the original prompt position of every slot (padding slots hold some position; mask them)."""
        if self.positions is not None:
            return self.positions
        return torch.arange(self.vision_mask.shape[1], device=self.vision_mask.device).expand_as(self.vision_mask)

    def vision_positions(self, row: int) -> torch.Tensor:
        """Ascending positions of the vision tokens of one row."""
        return self.vision_mask[row].nonzero().squeeze(1)

    def padded_vision_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's vision positions at once, for batched selection: (positions [B, V], valid [B, V]).

        Row r's positions come first, ascending, then padding slots (False in `valid`, pointing at position 0);
        V is the largest vision count of the batch.
        """
        vision = self.vision_mask.bool()
        counts = vision.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        # A stable sort on "not vision" puts each row's vision positions first, in order.
        positions = torch.sort((~vision).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=vision.device) < counts[:, None]
        return positions.masked_fill(~valid, 0), valid


@dataclass(frozen=True)
class Needs:
    """What a method reads besides layer K-1's hidden states; the hooks capture exactly that, so a method that
    asks for nothing keeps the model's fused attention kernels."""

    keys: bool = False  # `SelectionContext.keys`: layer K-1 keys after RoPE
    last_row_attention: bool = False  # `SelectionContext.last_row_attention`: the last token's layer K-1 attention
    attention_rows: bool = False  # `SelectionContext.attention_rows`: any query rows' layer K-1 attention
    prompt_inputs: bool = False  # `SelectionContext.prompt`: layer 0's input, whole prompt
    image_grids: bool = False  # the family's 2-D layout of each image (`Family.image_grids`)
    vision_saliency: bool = False  # vision-tower attention and keys (`Family.vision_saliency`)

    def previous_layer(self) -> bool:
        """Whether it reads layer K-1's keys or attention (which no layer provides at K = 0)."""
        return self.keys or self.last_row_attention or self.attention_rows


_LEGACY_NEEDS = {f"needs_{name}": name for name in Needs.__dataclass_fields__}


@dataclass
class Selection:
    """A method's answer: kept vision positions per row (ascending) and, optionally, new states for them.

    `new_states[row]` ([k, D], aligned with `kept_vision[row]`) replaces the hidden states of the kept
    tokens (average pooling does this); positions, and so RoPE, stay those of the kept tokens.
    """

    kept_vision: list[torch.Tensor]
    new_states: list[torch.Tensor] | None = None


class PruningMethod:
    """Base class: a method is a name, what it reads (`needs`), its options and one `select()`.

    A method declares its options in `option_specs` (name -> `tuner.config.options.Option`: type, default, valid
    values, default search range); `PruningConfig` checks a configuration's options against them and fills in
    the defaults, so `config.options` holds every option. `option_defaults` is derived from the specs (a class
    that declares only `option_defaults` gets unchecked, unsearchable options). `validate` adds the checks that
    involve several options or the amount; `paper_setting` is the published setting a study tries first.
    """

    name: ClassVar[str]
    needs: Needs = Needs()  # a class declares it; an instance may narrow it for its options (DART without keys)
    needs_amount: ClassVar[bool] = True  # whether keep_ratio or budget must be given
    default_layer: ClassVar[int] = 2  # the K where the method naturally prunes (what `eval` uses without --layer)
    option_specs: ClassVar[dict[str, Option]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}
    paper_setting: ClassVar[PaperSetting | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = {field: cls.__dict__[flag] for flag, field in _LEGACY_NEEDS.items() if flag in cls.__dict__}
        if legacy:  # a method written for the flags (`needs_keys = True`) before `needs` replaced them
            warnings.warn(f"{cls.__name__}: the needs_* flags are deprecated; declare needs = Needs(...)",
                          DeprecationWarning, stacklevel=2)
            cls.needs = replace(cls.needs, **legacy)
        if "option_specs" in cls.__dict__:
            cls.option_defaults = {name: spec.default for name, spec in cls.option_specs.items()}
        elif "option_defaults" in cls.__dict__:
            cls.option_specs = {name: Option(None, default) for name, default in cls.option_defaults.items()}

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.options = dict(config.options)  # checked, every default filled in (`resolve_options`)

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`options` checked one by one against `option_specs`, every default filled in (ValueError otherwise)."""
        return resolve_options(cls.name, cls.option_specs, options)

    @classmethod
    def validate(cls, config: PruningConfig) -> None:
        """Reject a missing amount; subclasses check what involves several options (each option's own values are
        checked against its spec before this runs)."""
        if cls.requires_amount(config) and config.keep_ratio is None and config.budget is None:
            raise ValueError(f"method {cls.name!r} needs keep_ratio (in (0, 1]) or budget (>= 1)")

    @classmethod
    def reads_previous_layer(cls, config: PruningConfig) -> bool:
        """Whether this config reads layer K-1's keys or attention, which no layer provides at K = 0."""
        return cls.needs.previous_layer()

    @classmethod
    def requires_amount(cls, config: PruningConfig) -> bool:
        """Whether this config must say how much to keep (some options fix the amount themselves)."""
        return cls.needs_amount

    def bind_family(self, family: Any) -> None:
        """Settle anything that depends on the model family (a `tuner.models.families.Family`), before any compute."""

    def select(self, ctx: SelectionContext) -> Selection:
        """Choose the vision tokens to keep in every row."""
        raise NotImplementedError


class ScoredMethod(PruningMethod):
    """A method that ranks: it scores every token (`scores`), and each row keeps its `budget` highest-scoring
    vision tokens, ties to the earlier position, so that a method of this kind is its score function."""

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """[B, N] a score per slot; higher is kept first (only vision slots are read)."""
        raise NotImplementedError

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection(top_vision(self.scores(ctx), ctx))


def top_vision(scores: torch.Tensor, ctx: SelectionContext) -> list[torch.Tensor]:
    """Per row, the positions of its `ctx.budgets[row]` highest-scoring vision tokens (ties to the earlier
    position), ascending; a budget above the row's vision count keeps them all."""
    positions, valid = ctx.padded_vision_positions()
    ranked = scores.float().gather(1, positions).masked_fill(~valid, -math.inf)
    # Stable: equal scores keep position order; a row's padding slots come after its vision slots.
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    counts = valid.sum(1).tolist()
    return [positions[row, order[row, :min(budget, counts[row])]].sort().values
            for row, budget in enumerate(ctx.budgets)]
