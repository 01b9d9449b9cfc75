"""All hook mechanics in one place: prune vision tokens before decoder layer K of a stock transformers VLM.

Forward pre-hooks only, no copied `forward` (`DART.md` §5):
- on the top-level model: note `input_ids` (vision positions) and the 2D padding mask of each call;
- on layer K-1's attention, when the method needs them: keys after RoPE and the last query's attention;
- on every layer i >= K: in prefill, layer K selects; every such layer then gets the gathered hidden
  states, its own (cos, sin) gathered at the kept positions (original positions, gaps kept),
  `position_ids=None` and a causal mask rebuilt for the shorter sequence. In decode only the mask is
  rebuilt, against the shorter cache of layers >= K; positions already continue from the full length.
Rows keeping different counts are left-padded with masked slots, so the last slot is the last token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tuner.config import PruningConfig, check_layer
from tuner.models.families import FamilyAdapter, PrunedPrefill
from tuner.pruning.base import SelectionContext
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.registry import get_method_class
from tuner.transformers_compat import cache_from_kwargs, positions_from_mask


@dataclass(frozen=True)
class RequestStats:
    """Token counts of one pruned prefill, per row (padding excluded)."""

    n_tokens: list[int]
    n_vision: list[int]
    n_kept_vision: list[int]

    @property
    def n_kept(self) -> list[int]:
        """All tokens kept per row: every non-vision token plus the kept vision tokens."""
        return [t - v + k for t, v, k in zip(self.n_tokens, self.n_vision, self.n_kept_vision)]


@dataclass
class _Prompt:
    """What the top-level hook saw for the current prefill."""

    input_ids: torch.Tensor  # [B, N]
    vision: torch.Tensor  # [B, N] bool, padding excluded
    attention: torch.Tensor  # [B, N] bool
    n_vision: list[int]  # per row
    state: Any = None  # the family's per-token extras (Family.prompt_state)
    grids: Any = None  # the family's image grids (Family.image_grids), if the method needs them


@dataclass
class _ForwardPlan:
    """Substitutions for layers >= K during one forward."""

    masks: dict[str, Any]
    gather_index: torch.Tensor | None = None  # [B, P] prefill only
    hidden_states: torch.Tensor | None = None  # [B, P, D] prefill only
    gathered_rotary: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    pruned: PrunedPrefill | None = None  # prefill only


class PruningHandle:
    """Hooks that prune one model according to one config; a context manager, removable with `remove()`.

    `last_kept[row]` holds the kept positions of the last prefill (all tokens, original order, padding
    excluded); `requests` holds a `RequestStats` for every prefill since the hooks were attached.
    """

    def __init__(self, model: torch.nn.Module, config: PruningConfig, adapter: FamilyAdapter) -> None:
        check_layer(config.layer, len(adapter.layers))
        if getattr(model, "_dart_tuner_handle", None) is not None:
            raise RuntimeError("this model already has pruning applied; remove that handle first")
        self.model = model
        self.config = config
        self.adapter = adapter
        self.method = get_method_class(config.method)(config)
        self.method.bind_family(adapter.spec)
        self.last_kept: list[torch.Tensor] = []
        self.requests: list[RequestStats] = []
        self._layer_types = adapter.layer_types
        self._prompt: _Prompt | None = None
        self._attention_2d: torch.Tensor | None = None
        self._pruned_prompt: tuple[torch.Tensor, int] | None = None  # (kept 2D mask [B, P], prompt length N)
        self._plan: _ForwardPlan | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._capture: AttentionCapture | None = None
        self._attach()

    # -- lifecycle -------------------------------------------------------------------------------
    def _attach(self) -> None:
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for index in range(self.config.layer, len(self.adapter.layers)):
                hook = self._on_layer_k if index == self.config.layer else self._on_later_layer
                self._hooks.append(self.adapter.layers[index].register_forward_pre_hook(
                    _bind_layer(hook, index), with_kwargs=True))
            if self.method.needs_keys or self.method.needs_last_row_attention:
                self._capture = AttentionCapture(
                    self.adapter.layers[self.config.layer - 1].self_attn,
                    keys=self.method.needs_keys, last_row_attention=self.method.needs_last_row_attention)
            self._hooks.extend(self.adapter.spec.extra_hooks(self.adapter.text_model, self._current_prefill))
            self.model._dart_tuner_handle = self
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook and restore layer K-1's attention; safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if getattr(self.model, "_dart_tuner_handle", None) is self:
            del self.model._dart_tuner_handle
        self._prompt = self._plan = self._pruned_prompt = None

    @property
    def active(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._hooks)

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Top-level pre-hook: find the vision tokens of a new prompt, validate, before any compute."""
        self._plan = None  # a plan lives for one forward
        mask = kwargs.get("attention_mask")
        self._attention_2d = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        substituted = self._number_positions_per_row(args, kwargs)
        cache = cache_from_kwargs(kwargs)
        if cache is not None and cache.get_seq_length(self.config.layer) > 0:
            return substituted  # decode / continuation of the pruned prompt
        self._pruned_prompt = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids to locate the vision tokens; "
                             "call the model with input_ids rather than inputs_embeds")
        attention = self._attention_2d
        if attention is None:
            attention = _padding_from_prebuilt_mask(mask, input_ids.shape[1])
        if attention is None:
            attention = torch.ones_like(input_ids, dtype=torch.bool)
        vision = self.adapter.vision_mask(input_ids, attention)
        n_vision = vision.sum(1).tolist()
        if not any(n_vision):
            if self.config.require_vision:
                raise ValueError(f"no vision tokens in the prompt (none of the token ids "
                                 f"{list(self.adapter.vision_token_ids)} appear in input_ids); set "
                                 "PruningConfig(require_vision=False) to let text-only prompts through")
            self._prompt = None
            return substituted
        if self.method.needs_keys:  # DART's image pivots must exist in every row that has vision tokens
            for row, n in enumerate(n_vision):
                if 0 < n < self.config.n_image_pivots:
                    raise ValueError(f"n_image_pivots={self.config.n_image_pivots} exceeds the {n} vision "
                                     f"tokens of batch row {row}")
        grids = self.adapter.spec.image_grids(self.model.config, kwargs, input_ids, vision) \
            if self.method.needs_image_grids else None
        self._prompt = _Prompt(input_ids, vision, attention, n_vision,
                               state=self.adapter.spec.prompt_state(kwargs, input_ids), grids=grids)
        return substituted

    def _number_positions_per_row(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Give a left-padded call without `position_ids` the positions generate() would give it.

        Left alone, transformers numbers 1-D positions from 0 across the padding. The unpruned model does not
        care (RoPE attention sees relative positions only), but the selection does: the L1 norm of post-RoPE
        keys, which ranks DART's pivots, depends on absolute position, so a padded row would keep another set
        than the same row alone. Families that derive their positions from the mask themselves are left alone.
        """
        if (not self.adapter.positions_ignore_padding or kwargs.get("position_ids") is not None
                or self._attention_2d is None or bool(self._attention_2d.all())):
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        kwargs["position_ids"] = positions_from_mask(self._attention_2d, tokens.shape[1])
        return args, kwargs

    def _on_layer_k(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Layer K pre-hook: select in prefill, rebuild masks in decode, then substitute."""
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = cache_from_kwargs(kwargs)
        if cache is None or cache.get_seq_length(index) == 0:
            self._plan = self._prune(hidden, cache) if self._prompt is not None else None
        else:
            self._plan = self._decode_plan(hidden, cache) if self._pruned_prompt is not None else None
        if self._plan is None:
            return None
        if self._plan.hidden_states is not None:
            if args:
                args = (self._plan.hidden_states, *args[1:])
            else:
                kwargs["hidden_states"] = self._plan.hidden_states
        return self._substitute(index, args, kwargs)

    def _on_later_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None if self._plan is None else self._substitute(index, args, kwargs)

    def _substitute(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        plan = self._plan
        kwargs["attention_mask"] = plan.masks[self._layer_types[index]]
        if plan.gather_index is not None:
            kwargs["position_embeddings"] = self._gathered_rotary(kwargs.get("position_embeddings"))
            kwargs["position_ids"] = None  # rotary is applied already; gapped ids would look "packed"
        return args, kwargs

    def _gathered_rotary(self, rotary: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        """(cos, sin) at the kept positions, gathered once per forward per distinct table."""
        if rotary is None:
            return None
        plan = self._plan
        key = id(rotary[0])
        if key not in plan.gathered_rotary:
            plan.gathered_rotary[key] = tuple(_gather_rows(t, plan.gather_index) for t in rotary)
        return plan.gathered_rotary[key]

    # -- prefill selection -----------------------------------------------------------------------
    def _prune(self, hidden: torch.Tensor, cache: Any) -> _ForwardPlan | None:
        prompt = self._prompt
        if prompt.vision.shape != hidden.shape[:2]:
            raise RuntimeError(f"layer {self.config.layer} received {tuple(hidden.shape[:2])} tokens but the "
                               f"prompt had {tuple(prompt.vision.shape)}; inputs_embeds-only calls are unsupported")
        capture = self._capture
        context = SelectionContext(
            hidden_states=hidden, vision_mask=prompt.vision, attention_mask=prompt.attention,
            input_ids=prompt.input_ids, budgets=[self.config.budget_for(n) for n in prompt.n_vision],
            final_norm=self.adapter.text_model.norm,
            keys=capture.take_keys() if capture is not None else None,
            last_row_attention=capture.last_row_attention if capture is not None else None,
            image_grids=prompt.grids,
        )
        with torch.no_grad():
            selection = self.method.select(context)
        if capture is not None:
            capture.clear()

        keep = prompt.attention & ~prompt.vision
        cols = torch.cat(list(selection.kept_vision)).to(hidden.device)
        rows = torch.cat([torch.full((len(k),), row, device=hidden.device)
                          for row, k in enumerate(selection.kept_vision)])
        if not bool(prompt.vision[rows, cols].all()):
            raise RuntimeError(f"method {self.config.method!r} selected a position that is not a vision token")
        keep[rows, cols] = True
        n_kept = keep.sum(1)
        kept_counts = n_kept.tolist()
        width = max(kept_counts)
        length = keep.shape[1]
        # Stable sort on the keep flag puts each row's kept positions last, in order: a left-padded gather.
        gather_index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - width:]
        slots_valid = torch.arange(width, device=keep.device) >= (width - n_kept)[:, None]
        self.last_kept = [gather_index[row, width - n:] for row, n in enumerate(kept_counts)]
        self.requests.append(RequestStats(
            n_tokens=prompt.attention.sum(1).tolist(), n_vision=prompt.n_vision,
            n_kept_vision=[int(k.numel()) for k in selection.kept_vision]))
        if width == length and selection.new_states is None:
            return None  # nothing removed, no padding to drop: the unmodified forward is exact

        if selection.new_states is not None:
            hidden = hidden.clone()
            hidden[rows, cols] = torch.cat(list(selection.new_states)).to(hidden.dtype)
        gathered = hidden.gather(1, gather_index[..., None].expand(-1, -1, hidden.shape[-1]))
        self._pruned_prompt = (slots_valid, length)
        pruned = PrunedPrefill(gather_index=gather_index, valid=slots_valid, length=length)
        kept_state = None if prompt.state is None else self.adapter.spec.gather_state(prompt.state, pruned)
        return _ForwardPlan(masks=self._masks(gathered, slots_valid, cache, kept_state), gather_index=gather_index,
                            hidden_states=gathered, pruned=pruned)

    # -- decode ----------------------------------------------------------------------------------
    def _decode_plan(self, hidden: torch.Tensor, cache: Any) -> _ForwardPlan:
        kept_2d, prompt_length = self._pruned_prompt
        batch, n_query = hidden.shape[:2]
        n_appended = cache.get_seq_length(self.config.layer) + n_query - kept_2d.shape[1]
        if self._attention_2d is not None:
            tail = self._attention_2d[:, prompt_length:]
            if tail.shape != (batch, n_appended) or kept_2d.shape[0] != batch:
                raise RuntimeError(f"attention_mask {tuple(self._attention_2d.shape)} does not continue the "
                                   f"pruned prompt of {prompt_length} tokens with {n_appended} new ones")
        else:
            tail = torch.ones(batch, n_appended, dtype=torch.bool, device=hidden.device)
        return _ForwardPlan(masks=self._masks(hidden, torch.cat([kept_2d, tail], 1), cache))

    def _masks(self, hidden: torch.Tensor, mask_2d: torch.Tensor, cache: Any,
               kept_state: Any = None) -> dict[str, Any]:
        """One mask per attention type, sized against the first pruned layer of that type, as the family builds it."""
        mask_2d = None if bool(mask_2d.all()) else mask_2d  # lets sdpa take its is_causal fast path
        masks = {}
        for layer_type in dict.fromkeys(self._layer_types[self.config.layer:]):
            first = self._layer_types.index(layer_type, self.config.layer)
            masks[layer_type] = self.adapter.spec.layer_mask(
                layer_type, config=self.adapter.text_model.config, hidden=hidden, mask_2d=mask_2d, cache=cache,
                layer_idx=first, kept_state=kept_state)
        return masks

    def _current_prefill(self) -> PrunedPrefill | None:
        """The pruning of the prefill now running, for the family's extra hooks (None in decode or unpruned)."""
        return None if self._plan is None else self._plan.pruned


def _padding_from_prebuilt_mask(mask: Any, length: int) -> torch.Tensor | None:
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


def _bind_layer(hook, index: int):
    """A pre-hook for decoder layer `index` that forwards to `hook(index, args, kwargs)`."""

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
        return hook(index, args, kwargs)

    return pre_hook


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather a [B or 1, N, d] table at per-row positions [B, P] -> [B, P, d]."""
    table = table.expand(index.shape[0], *table.shape[1:])
    return table.gather(1, index[..., None].expand(-1, -1, table.shape[-1]))
