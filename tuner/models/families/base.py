"""`Family`: everything dart-tuner knows about one VLM family, and `FamilyAdapter`: a family bound to a loaded model.

A family file subclasses `Family`, sets its facts as class attributes, overrides the few methods where its
models differ (prompt format, masks, extra per-token tensors, processor fallback) and registers itself with
`@register_family`. Nothing outside `tuner/models/families/` names a family.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel, ProcessorMixin

from tuner.errors import DartTunerError
from tuner.models.compat import build_mask
from tuner.models.cost import TextDims
from tuner.models.families.grids import ImageGrids, grids_from_runs

VISION_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def chatml_user_turn(content: str) -> str:
    """One ChatML user turn holding `content`, ending where the assistant's answer starts (Qwen2-based models)."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


class ProcessorSettingError(DartTunerError, ValueError):
    """A processor setting the model's family does not have, or a value it cannot take; the message names it."""


def set_image_processor(processor: ProcessorMixin, **values: Any) -> Callable[[], None]:
    """Set attributes of `processor`'s image processor (the settings it reads on every call) and return the undo,
    which restores the values as loaded."""
    images = processor.image_processor
    saved = {name: getattr(images, name) for name in values}
    for name, value in values.items():
        setattr(images, name, value)

    def undo() -> None:
        for name, value in saved.items():
            setattr(images, name, value)
    return undo


def check_range(settings: Mapping[str, int], low_name: str, high_name: str, loaded: tuple[int, int]
                ) -> tuple[int, int]:
    """The (low, high) pair of two settings, each unset one as loaded (`loaded`); low above high is one line."""
    low, high = settings.get(low_name, loaded[0]), settings.get(high_name, loaded[1])
    if low > high:
        raise ProcessorSettingError(f"processor.{low_name} {low} is above processor.{high_name} {high}")
    return low, high


@dataclass(frozen=True)
class PrunedPrefill:
    """How the current prefill was pruned, as the extra hooks of a family need it.

    `gather_index` [B, P] holds each row's kept positions, left-padded (`valid` [B, P] is False on the
    padding slots); `length` is the prompt length N before pruning.
    """

    gather_index: torch.Tensor
    valid: torch.Tensor
    length: int


@dataclass(frozen=True)
class VisionAttention:
    """What one call of a vision-tower attention recorded: per sequence, the saliency of each token (averaged over
    heads, `Family.vision_saliency_query` decides which queries) and its keys averaged over heads."""

    saliency: torch.Tensor  # [S, n] float32
    keys: torch.Tensor  # [S, n, d] float32


@dataclass(frozen=True)
class VisionTowerRun:
    """What the vision tower recorded in one prefill: every call of the captured attention, in order, and the
    keyword arguments of every call of the module `Family.vision_tower` names (e.g. Qwen's `grid_thw`)."""

    attention: list[VisionAttention]
    tower_calls: list[dict[str, Any]]


def scatter_to_vision(values: torch.Tensor, vision: torch.Tensor, what: str) -> torch.Tensor:
    """Per-token values [T, ...] laid on the vision tokens of `vision` [B, N] in row-major order, as the model itself
    fills them (`masked_scatter`); [B, N, ...] with zeros elsewhere. A count mismatch is a RuntimeError.

    `generate` with beams (or several returned sequences) runs the tower once per prompt and then repeats every
    row k times in place; values covering exactly the first row of each such group are repeated alike.
    """
    n_tokens = int(vision.sum())
    values = _repeat_for_expanded_rows(values, vision.sum(1))
    if values.shape[0] != n_tokens:
        raise RuntimeError(f"the vision tower's {what} cover {values.shape[0]} tokens but the prompt has {n_tokens} "
                           "vision tokens (was the vision tower run for another batch?)")
    out = values.new_zeros(*vision.shape, *values.shape[1:])
    out[vision] = values.to(vision.device)
    return out


def _repeat_for_expanded_rows(values: torch.Tensor, row_counts: torch.Tensor) -> torch.Tensor:
    """`values` of the prompts before `generate` repeated each row k times, when the counts say so (else unchanged)."""
    n_rows, total = row_counts.numel(), int(row_counts.sum())
    if values.shape[0] == 0 or values.shape[0] == total or total % values.shape[0]:
        return values
    k = total // values.shape[0]
    if n_rows % k or not bool((row_counts.view(-1, k) == row_counts.view(-1, k)[:, :1]).all()):
        return values
    firsts = row_counts.view(-1, k)[:, 0].tolist()
    if sum(firsts) != values.shape[0]:
        return values
    return torch.cat([chunk for chunk in values.split(firsts) for _ in range(k)])


class Family:
    """One VLM family's facts and behaviour; subclass once per family file and register it.

    Class attributes are the facts; the methods have defaults that fit LLaVA-style models (vision tokens
    marked by an id in the config, one decoder with `.layers` and `.norm`, plain causal masks).
    """

    name: ClassVar[str]
    """Family name stored in studies and presets, e.g. "qwen2_vl"."""
    model_types: ClassVar[tuple[str, ...]]
    """`config.model_type` values of this family, checked before any weights are read."""
    class_names: ClassVar[tuple[str, ...]]
    """Top-level transformers classes, e.g. ("Qwen2VLForConditionalGeneration",)."""
    fixed_image_tokens: ClassVar[bool] = False
    """Whether every image becomes the same number of vision tokens, whatever its size (one resized crop)."""
    positions_from_mask: ClassVar[bool] = False
    """Whether the top-level forward derives positions from the attention mask when given none (M-RoPE)."""
    reference_quota_rule: ClassVar[str | None] = None
    """The DART reference code's per-pivot quota rule for this family (`tuner.pruning.dart.QUOTA_RULES`)."""
    image_placeholder: ClassVar[str] = "<image>"
    """The text a prompt holds where an image goes, when the processor does not say."""
    image_only_processor: ClassVar[type[ProcessorMixin] | None] = None
    """A processor class built without a video processor, for when torchvision is missing."""
    hub_id: ClassVar[str] = ""
    """The checkpoint users would pick."""
    search_space: ClassVar[str] = ""
    """Its default search space, a file in `search_spaces/` (for `hub_id`)."""
    processor_settings: ClassVar[Mapping[str, str]] = {}
    """The processor's own settings that set how many vision tokens an image becomes, by the processor's names
    (`tuner.models.processor_budget`): name -> what it sets, in a few words."""

    def set_processor(self, processor: ProcessorMixin, model: torch.nn.Module,
                      settings: Mapping[str, int]) -> Callable[[], None]:
        """Apply checked `processor_settings` to the processor (and the model, where it must follow) and return
        what undoes it; ProcessorSettingError naming a value the model cannot take."""
        raise ProcessorSettingError(f"family {self.name} has no processor settings")

    def loaded_processor_settings(self, processor: ProcessorMixin) -> dict[str, int]:
        """The values of `processor_settings` the processor has as loaded (a setting at its loaded value is the
        default processor, not a choice)."""
        return {}

    # -- the loaded model ---------------------------------------------------------------------------
    def transformers_class(self) -> type[PreTrainedModel]:
        """The transformers class of `class_names[0]` (what `AutoModelForImageTextToText` loads)."""
        return getattr(transformers, self.class_names[0])

    def vision_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        """Ids that mark vision tokens in `input_ids`, read from the top-level config."""
        ids = tuple(dict.fromkeys(value for name in VISION_ID_FIELDS
                                  if isinstance(value := getattr(config, name, None), int)))
        if not ids:
            raise ValueError(f"{type(config).__name__} defines none of {VISION_ID_FIELDS}")
        return ids

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack (with `.layers` and a final `.norm`) that the pruning hooks attach to."""
        return model.get_decoder()

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The text model's config."""
        return config.get_text_config()

    def text_dims(self, config: PretrainedConfig) -> TextDims:
        """The decoder sizes the cost model (`tuner.models.cost`) reads, from the top-level config."""
        return TextDims.from_config(self.text_config(config))

    image_features_method: ClassVar[str] = "get_image_features"
    """The method of `image_features_owner` that runs the vision tower and projector (the feature cache wraps it)."""

    def image_features_owner(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose `image_features_method` makes the image features: the inner model (`model.base_model`).

        In transformers 5 both `generate` (which encodes the images before the prefill) and the inner model's
        forward call `base_model.get_image_features`; the top-level one only delegates. Falls back to `model`.
        """
        inner = getattr(model, "base_model", model)
        return inner if callable(getattr(inner, self.image_features_method, None)) else model

    vision_saliency_query: ClassVar[str | None] = None
    """How the vision tower ranks its tokens for `visionzip`: "cls" (the CLS token's attention row) or "mean" (the
    attention each token receives, averaged over the queries); None: the family does not map it to its tokens."""

    def vision_attention(self, model: torch.nn.Module) -> torch.nn.Module:
        """The attention module of the vision-tower layer whose output the model uses (`visionzip` captures there)."""
        raise ValueError(f"family {self.name!r} does not map vision-tower attention to its vision tokens")

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module whose calls' keyword arguments `vision_saliency` needs (None: it needs none)."""
        return None

    def vision_saliency(self, config: PretrainedConfig, run: VisionTowerRun, input_ids: torch.Tensor,
                        vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency [B, N], keys [B, N, d]) on the language model's vision tokens (`vision` [B, N] of `input_ids`),
        from what the vision tower recorded during this prefill."""
        raise ValueError(f"family {self.name!r} does not map vision-tower attention to its vision tokens")

    # -- prompts and processors ---------------------------------------------------------------------
    def fallback_prompt(self, text: str, n_images: int) -> str:
        """One user turn in the family's documented format, for processors without a chat template."""
        return f"USER: {self.image_placeholder * n_images}\n{text} ASSISTANT:"

    def processor_images(self, images: Sequence[Sequence[Any]]) -> list[Any]:
        """A batch's images as its processor takes them, from one list per prompt (default: one flat list)."""
        return [image for row in images for image in row]

    # -- hooks: what differs per family during a pruned forward -------------------------------------
    def prompt_state(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> Any:
        """Per-token data a family's masks need, noted at the top-level call of a prefill (None: nothing)."""
        return None

    def image_grids(self, config: PretrainedConfig, kwargs: dict[str, Any], input_ids: torch.Tensor,
                    vision: torch.Tensor) -> list[ImageGrids]:
        """Each row's images as 2-D grids of sequence positions, from a prefill's top-level call (`window_fastv`).

        `vision` [B, N] marks the vision tokens. The default cuts each contiguous run of them into chunks of
        `grid_tokens(config)` (the whole run when None) and takes a square chunk as a square grid; other chunks
        go to the leftover, which methods treat as 1-D.
        """
        return grids_from_runs(vision, self.grid_tokens(config))

    def grid_tokens(self, config: PretrainedConfig) -> int | None:
        """Vision tokens of one square grid (an image, a tile) when the config fixes it; None: a whole run."""
        return None

    def continued_positions(self, model: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """`position_ids` for tokens after the prompt, from their 1-D places in the full sequence [B, n].

        Needed after a prefill pruned before layer 0, where no cache length tells the model where it is.
        """
        return positions

    def gather_state(self, state: Any, pruned: PrunedPrefill) -> Any:
        """`prompt_state` at the kept positions (padding slots get a neutral value)."""
        return None

    def layer_mask(self, layer_type: str, *, config: PretrainedConfig, hidden: torch.Tensor,
                   mask_2d: torch.Tensor | None, cache: Any, layer_idx: int, kept_state: Any) -> Any:
        """The attention mask for the pruned layers of `layer_type`, first of which is `layer_idx`.

        `kept_state` is `gather_state` in a pruned prefill and None in decode. The default is the causal
        (or sliding-window causal) mask transformers builds from a 2D padding mask.
        """
        return build_mask(layer_type, config=config, inputs_embeds=hidden, attention_mask=mask_2d, cache=cache,
                          layer_idx=layer_idx)

    def extra_hooks(self, text_model: torch.nn.Module,
                    pruned: Callable[[], PrunedPrefill | None]) -> list[Any]:
        """Hooks beyond the decoder layers' pre-hooks (each with `.remove()`); `pruned()` is the live prefill."""
        return []

    # -- tiny test models ---------------------------------------------------------------------------
    tiny_image_sizes: ClassVar[tuple[tuple[int, int], tuple[int, int]]] = ((160, 120), (120, 160))
    """(width, height) of the test images of batch rows 0 and 1."""

    def tiny(self, tokenizer: Any, layers: int) -> tuple[PreTrainedModel, ProcessorMixin]:
        """A tiny random-weight model of this family and its processor over `tokenizer` (tests)."""
        raise NotImplementedError(f"family {self.name!r} has no tiny test model")

    def reference_after_layer(self, text_model: torch.nn.Module, index: int, hidden: torch.Tensor,
                              text_kwargs: dict[str, Any], kept: torch.Tensor) -> torch.Tensor:
        """Tests' hand-run: what the text model adds after layer `index` beyond it, at row 0's kept positions."""
        return hidden

    def row_images(self, batch: BatchFeature, row: int) -> dict[str, torch.Tensor]:
        """The image inputs of batch row `row` alone (each row holds one image)."""
        out = {"pixel_values": batch["pixel_values"][row:row + 1]}
        for key in ("image_sizes", "pixel_attention_mask"):
            if key in batch:
                out[key] = batch[key][row:row + 1]
        return out

    def save_processor(self, processor: ProcessorMixin, path: Any) -> None:
        """Save a processor the way a real checkpoint ships it."""
        if self.image_only_processor is not None:  # a checkpoint's layout minus the video processor
            processor.tokenizer.save_pretrained(path)
            processor.image_processor.save_pretrained(path)
            # The processor's own settings (tokens per image, ...), under the transformers class they belong to.
            settings = {k: v for k, v in processor.to_dict().items()
                        if k not in (*processor.get_attributes(), "processor_class")}
            if settings:
                settings["processor_class"] = next(c.__name__ for c in type(processor).__mro__
                                                   if c.__module__.startswith("transformers."))
                (Path(path) / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        else:
            processor.save_pretrained(path)

    # -- published sizes ----------------------------------------------------------------------------
    def published_config(self) -> PretrainedConfig:
        """The config of `hub_id` at its published size, built offline from its published values."""
        raise NotImplementedError(f"family {self.name!r} has no published-size config")

    def published_processor(self, tokenizer: Any) -> ProcessorMixin:
        """A processor with `hub_id`'s image settings over `tokenizer`, adding the family's tokens as `tiny` does."""
        raise NotImplementedError(f"family {self.name!r} has no published-size processor")

    def published_vision_tokens(self, config: PretrainedConfig, image_inputs: dict[str, torch.Tensor]) -> int | None:
        """None: tests/test_published_sizes.py runs the model's own vision path on meta tensors for the count.

        Override only where that path cannot run on meta (it reads pixel values), returning the count of
        vision tokens derived from `config` for these processor outputs, with the reason in the docstring.
        """
        return None

    def __repr__(self) -> str:
        return f"<family {self.name}>"


@dataclass(frozen=True)
class FamilyAdapter:
    """A family bound to one loaded model: where pruning hooks go and how to spot its vision tokens."""

    family: str
    text_model: torch.nn.Module  # the decoder stack (LlamaModel, Qwen2VLTextModel, ...)
    vision_token_ids: tuple[int, ...]
    spec: Family

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.text_model.layers

    @property
    def positions_ignore_padding(self) -> bool:
        """Whether a call without `position_ids` numbers positions 0..N-1 straight across left padding."""
        return not self.spec.positions_from_mask

    def vision_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Where each row's vision tokens are: ids among `vision_token_ids`, padding excluded."""
        return torch.isin(input_ids, _ids_on(self.vision_token_ids, input_ids.device)) & attention_mask.bool()

    @property
    def layer_types(self) -> list[str]:
        """Attention type per decoder layer; configs without `layer_types` are all full attention."""
        types = getattr(self.text_model.config, "layer_types", None)
        return list(types) if types else ["full_attention"] * len(self.layers)


@functools.lru_cache(maxsize=64)
def _ids_on(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The token ids as a tensor on `device`, made once: the hooks ask on every prefill."""
    return torch.tensor(ids, device=device)


def bind(spec: Family, model: torch.nn.Module, vision_token_ids: Sequence[int] | None = None) -> FamilyAdapter:
    """`spec` bound to `model`, with the decoder checked; explicit `vision_token_ids` override the config's."""
    ids = tuple(int(i) for i in vision_token_ids) if vision_token_ids is not None else \
        spec.vision_token_ids(model.config)
    if not ids:
        raise ValueError("vision_token_ids must name at least one token id")
    try:
        text_model = spec.decoder(model)
    except (AttributeError, NotImplementedError):
        text_model = None
    if text_model is None or not isinstance(getattr(text_model, "layers", None), torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.get_decoder().layers)")
    if not hasattr(text_model, "norm"):
        raise ValueError(f"{type(text_model).__name__} has no final norm (`.norm`), which DART needs")
    return FamilyAdapter(family=spec.name, text_model=text_model, vision_token_ids=ids, spec=spec)
