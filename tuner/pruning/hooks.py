"""All hook mechanics in one place: prune vision tokens before decoder layer K of a stock transformers VLM.

Forward pre-hooks only, no copied `forward` (`docs/design/DART.md` §5):
- on the top-level model: note `input_ids` (vision positions) and the 2D padding mask of each call;
- on layer K-1's attention, when the method needs them: keys after RoPE and the attention of the last query (or
  of any query rows the method picks);
- on layer 0, when a method needs it: its input, the whole prompt's embeddings;
- on one vision-tower attention, when the first stage's method ranks by it (`visionzip`): each call's saliency and
  keys (`tuner.pruning.vision_capture`), mapped onto the vision tokens by the family at the selection;
- on every layer i >= K: in prefill, layer K selects; every such layer then gets the gathered hidden
  states, its own (cos, sin) gathered at the kept positions (original positions, gaps kept),
  `position_ids=None` and a causal mask rebuilt for the shorter sequence. In decode only the mask is
  rebuilt, against the shorter cache of layers >= K; positions already continue from the full length.
Rows keeping different counts are left-padded with masked slots, so the last slot is the last token.

A schedule repeats this at every stage layer K_0 < K_1 < ... (`tuner.pruning.stages`): stage j selects among
the tokens stage j-1 kept, with what was captured at its own layer K_j - 1, and its layers get tables, masks and
family state indexed by the composed ORIGINAL positions.

A request (one generate call, or one forward outside generate) is pruned once: inside a generate call, a full
forward continuing its request (`use_cache=False`) reuses its choice; a prompt whose attention mask hides every
vision token passes through unpruned (`tuner.pruning.request`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from tuner.config import PruningConfig, check_layers
from tuner.models.compat import cache_from_kwargs
from tuner.models.families import FamilyAdapter, PrunedPrefill
from tuner.models.feature_cache import NEEDS_VISION_TOWER
from tuner.pruning.base import PruningMethod, Selection, SelectionContext
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.layer_inputs import (
    bind_layer,
    continue_full_positions,
    decode_mask_2d,
    gather_rows,
    layer_masks,
    number_positions_per_row,
)
from tuner.pruning.profiling import step
from tuner.pruning.registry import get_method_class
from tuner.pruning.request import (
    GenerateCalls,
    Prompt,
    RequestChoice,
    RequestStats,
    note_stage,
    padding_from_prebuilt_mask,
)
from tuner.pruning.stages import (
    ForwardPlan,
    StageRunner,
    TokenView,
    keep_flags,
    left_padded_gather,
    selected_slots,
    stage_runners,
)
from tuner.pruning.vision_capture import VisionAttentionCapture


class PruningHandle:
    """Hooks that prune one model according to one config; a context manager, removable with `remove()`.

    `last_kept[row]` holds the positions the last stage of the last prefill kept (all tokens, original order,
    padding excluded), and `last_stage_kept[j][row]` those stage j kept; `requests` holds a `RequestStats` for
    every request since the hooks were attached: one per generate call, one per forward outside generate.
    """

    def __init__(self, model: torch.nn.Module, config: PruningConfig, adapter: FamilyAdapter) -> None:
        check_layers(config, len(adapter.layers))
        if getattr(model, "_dart_tuner_handle", None) is not None:
            raise RuntimeError("this model already has pruning applied; remove that handle first")
        self.model = model
        self.config = config
        self.adapter = adapter
        self.last_stage_kept: list[list[torch.Tensor]] = []
        self.requests: list[RequestStats] = []
        self._layer_types = adapter.layer_types
        self._stages: list[StageRunner] = []
        self._stage_at: dict[int, StageRunner] = {}  # by first layer
        self._prompt: Prompt | None = None
        self._request: RequestChoice | None = None  # the last request, for the calls that continue it
        self._generate_calls: GenerateCalls | None = None  # tells the model's generate() calls apart
        self._attention_2d: torch.Tensor | None = None
        self._prompt_length = 0
        self._view: TokenView | None = None  # the tokens the running stage's layers hold; None: the whole prompt
        self._decode_kept: list[torch.Tensor | None] = []  # per stage: its kept 2D mask [B, P], None if unpruned
        self._plan: ForwardPlan | None = None
        self._vision: VisionAttentionCapture | None = None  # the vision tower's attention, for the first stage
        self._hooks: list[Any] = []  # everything with a remove(): torch hook handles, undos (`on_remove`)
        self._attach()

    @property
    def last_kept(self) -> list[torch.Tensor]:
        """Per row, the original positions the last stage of the last prefill kept (empty before any)."""
        return self.last_stage_kept[-1] if self.last_stage_kept else []

    @property
    def method(self) -> PruningMethod:
        """The first stage's method."""
        return self._stages[0].method

    # -- lifecycle -------------------------------------------------------------------------------
    def _attach(self) -> None:
        try:
            self._stages = stage_runners(self.config, len(self.adapter.layers), self._build_method, self._capture_at)
            self._stage_at = {stage.start: stage for stage in self._stages}
            if gridded := [stage for stage in self._stages[1:] if stage.method.needs.image_grids]:
                raise ValueError(f"method {gridded[0].config.method!r} selects on image grids of original "
                                 "positions, which only the first stage sees; use it in the first stage only")
            if towered := [stage for stage in self._stages[1:] if stage.method.needs.vision_saliency]:
                raise ValueError(f"method {towered[0].config.method!r} ranks on the vision tower's attention, which "
                                 "only the first stage sees; use it in the first stage only")
            if self.method.needs.vision_saliency:
                spec = self.adapter.spec
                self._vision = VisionAttentionCapture(spec.vision_attention(self.model), spec.vision_saliency_query,
                                                      spec.vision_tower(self.model))
                setattr(spec.image_features_owner(self.model), NEEDS_VISION_TOWER, True)  # a cached answer skips it
            self._decode_kept = [None] * len(self._stages)
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            if any(stage.method.needs.prompt_inputs for stage in self._stages):  # ahead of a K = 0 stage's hook
                self._hooks.append(self.adapter.layers[0].register_forward_pre_hook(
                    self._on_first_layer, with_kwargs=True))
            for index in range(self.config.layer, len(self.adapter.layers)):
                self._hooks.append(self.adapter.layers[index].register_forward_pre_hook(
                    bind_layer(self._on_layer, index), with_kwargs=True))
            self._hooks.extend(self.adapter.spec.extra_hooks(self.adapter.text_model, self._current_prefill))
            self._generate_calls = GenerateCalls(self.model)
            self.model._dart_tuner_handle = self
        except BaseException:
            self.remove()
            raise

    def _build_method(self, config: PruningConfig) -> PruningMethod:
        method = get_method_class(config.method)(config)
        method.bind_family(self.adapter.spec)
        return method

    def _capture_at(self, layer: int, method: PruningMethod) -> AttentionCapture | None:
        """A capture on layer `layer`'s attention when the method reads layer K-1 (`reads_previous_layer`, which
        `PruningConfig` refuses at K = 0), else None (sdpa stays)."""
        if not method.reads_previous_layer(method.config):
            return None
        return AttentionCapture(self.adapter.layers[layer].self_attn, keys=method.needs.keys,
                                last_row_attention=method.needs.last_row_attention,
                                query_rows=method.needs.attention_rows)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Call `undo` when the hooks are removed (the processor settings applied with them)."""
        self._hooks.append(SimpleNamespace(remove=undo))

    def remove(self) -> None:
        """Remove every hook and restore the captured attention modules; safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._generate_calls is not None:
            self._generate_calls.remove()
            self._generate_calls = None
        for stage in self._stages:
            stage.remove()
        if self._vision is not None:
            self._vision.remove()
            self._vision = None
            owner = self.adapter.spec.image_features_owner(self.model)
            if hasattr(owner, NEEDS_VISION_TOWER):
                delattr(owner, NEEDS_VISION_TOWER)
        if getattr(self.model, "_dart_tuner_handle", None) is self:
            del self.model._dart_tuner_handle
        self._prompt = self._plan = self._view = self._request = None

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
        with step("model_call"):
            return self._read_call(args, kwargs)

    def _read_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """What `_on_model_call` does, inside its profiler step."""
        self._plan = None  # a plan lives for one forward
        mask = kwargs.get("attention_mask")
        self._attention_2d = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = cache_from_kwargs(kwargs)
        if cache is not None and cache.get_seq_length(self.config.layer) > 0:  # decode / continuation
            substituted = number_positions_per_row(self.adapter, self._attention_2d, args, kwargs)
            if self.config.layer == 0:
                args, kwargs = substituted or (args, kwargs)
                if self._decode_kept[0] is not None:
                    n_seen = self._prompt_length + cache.get_seq_length(0) - self._decode_kept[0].shape[1]
                    continue_full_positions(self.adapter, self.model, args, kwargs, n_seen, self._attention_2d)
                return args, kwargs
            return substituted
        self._view = None
        self._decode_kept = [None] * len(self._stages)
        if self._vision is not None and kwargs.get("pixel_values") is not None:
            self._vision.clear()  # the tower runs inside this call; anything recorded before belongs to another
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids to locate the vision tokens; "
                             "call the model with input_ids rather than inputs_embeds")
        self._prompt_length = input_ids.shape[1]
        attention = self._attention_2d
        if attention is None:
            attention = padding_from_prebuilt_mask(mask, input_ids.shape[1])
        if attention is None:
            attention = torch.ones_like(input_ids, dtype=torch.bool)
        self._prompt = self._read_prompt(input_ids, attention, kwargs)
        return None if self._prompt is None else number_positions_per_row(self.adapter, self._attention_2d, args,
                                                                          kwargs)  # passing through: as unhooked

    def _read_prompt(self, input_ids: torch.Tensor, attention: torch.Tensor, kwargs: dict) -> Prompt | None:
        """The prompt of a full forward (None: it passes through unpruned); one that continues its generate call's
        request carries that request's choice."""
        request, call = self._request, self._generate_calls.current
        if request is not None and request.continued_by(input_ids, attention, kwargs, call):
            vision, n_vision = request.extend(input_ids, attention)
            return Prompt(input_ids, vision, attention, n_vision, choice=request,
                          state=self.adapter.spec.prompt_state(kwargs, input_ids),
                          grids=self._grids(kwargs, input_ids, vision))
        self._request = None
        vision = self.adapter.vision_mask(input_ids, attention)
        n_vision = vision.sum(1).tolist()
        if not any(n_vision):
            if bool(self.adapter.vision_mask(input_ids, torch.ones_like(attention)).any()):
                self.requests.append(RequestStats.unpruned(attention, len(self._stages)))  # mask hides them
                return None
            if self.config.require_vision:
                raise ValueError(f"no vision tokens in the prompt (none of the token ids "
                                 f"{list(self.adapter.vision_token_ids)} appear in input_ids); set "
                                 "PruningConfig(require_vision=False) to let text-only prompts through")
            return None
        # only a later forward of the same generate call can continue a request: outside generate nothing is kept
        self._request = None if call is None else RequestChoice.begin(input_ids, attention, vision, kwargs, call)
        return Prompt(input_ids, vision, attention, n_vision, state=self.adapter.spec.prompt_state(kwargs, input_ids),
                      grids=self._grids(kwargs, input_ids, vision))

    def _grids(self, kwargs: dict, input_ids: torch.Tensor, vision: torch.Tensor) -> Any:
        """The family's image grids, if the first stage's method selects on them."""
        return self.adapter.spec.image_grids(self.model.config, kwargs, input_ids, vision) \
            if self.method.needs.image_grids else None

    def _on_first_layer(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of layer 0: keep the prompt's embeddings of a prefill for methods that read them."""
        cache = cache_from_kwargs(kwargs)
        if self._prompt is not None and (cache is None or cache.get_seq_length(0) == 0):
            self._prompt.embeddings = args[0] if args else kwargs["hidden_states"]

    def _on_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pre-hook of every layer >= K_0: a stage's first layer selects (prefill) or rebuilds masks (decode)."""
        stage = self._stage_at.get(index)
        if stage is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = cache_from_kwargs(kwargs)
            if cache is None or cache.get_seq_length(index) == 0:
                self._plan = self._prune(stage, hidden, cache) if self._prompt is not None else None
            else:
                self._plan = self._decode_plan(stage, hidden, cache)
            if self._plan is not None and self._plan.hidden_states is not None:
                if args:
                    args = (self._plan.hidden_states, *args[1:])
                else:
                    kwargs["hidden_states"] = self._plan.hidden_states
        return None if self._plan is None else self._substitute(index, args, kwargs)

    def _substitute(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        plan = self._plan
        with step("substitute"):
            kwargs["attention_mask"] = plan.masks[self._layer_types[index]]
            if plan.gather_index is not None:
                kwargs["position_embeddings"] = plan.rotary_at_kept(kwargs.get("position_embeddings"))
                kwargs["position_ids"] = None  # rotary is applied already; gapped ids would look "packed"
        return args, kwargs

    # -- prefill selection -----------------------------------------------------------------------
    def _prune(self, stage: StageRunner, hidden: torch.Tensor, cache: Any) -> ForwardPlan | None:
        """Stage `stage` selects among the tokens its input holds; the plan for its layers (None: nothing to do)."""
        prompt, view = self._prompt, self._view
        if view is None:
            vision, attention, input_ids = prompt.vision, prompt.attention, prompt.input_ids
        else:
            vision, attention = view.take(prompt.vision) & view.valid, view.valid
            input_ids = view.take(prompt.input_ids)
        if attention.shape != hidden.shape[:2]:
            raise RuntimeError(f"layer {stage.start} received {tuple(hidden.shape[:2])} tokens but expected "
                               f"{tuple(attention.shape)}; inputs_embeds-only calls are unsupported")
        started = time.perf_counter()
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(vision) if view is None \
            else view.index  # original position of each slot
        with step("select"):
            if prompt.choice is not None:  # a later step of the request: its choice stands
                selection, capture_ms = self._reused_selection(stage, positions, vision), 0.0
            else:
                selection, capture_ms = self._select(stage, hidden, vision, attention, input_ids)
        if stage.index == len(self._stages) - 1:
            prompt.embeddings = None  # no later stage reads layer 0's input
        if hidden.is_cuda:  # the gather below waits for the selection anyway
            torch.cuda.synchronize(hidden.device)
        select_ms = (time.perf_counter() - started) * 1e3 + capture_ms
        with step("gather"):
            keep = keep_flags(selection, vision, attention, stage.config.method)
            local, valid, kept_counts = left_padded_gather(keep)
            kept = local if view is None else view.index.gather(1, local)  # original positions
        with step("bookkeeping"):
            self._record(stage, selection, positions, kept, kept_counts, select_ms)
        if (view is None and valid.shape[1] == hidden.shape[1] and kept_counts == attention.sum(1).tolist()
                and selection.new_states is None):
            return None  # nothing removed, no padding to drop: the unmodified forward is exact
        with step("gather"):
            if selection.new_states is not None:
                rows, cols = selected_slots(selection, hidden.device)
                hidden = hidden.clone()
                hidden[rows, cols] = torch.cat(list(selection.new_states)).to(hidden.dtype)
            gathered = gather_rows(hidden, local)
        with step("masks"):
            self._view = TokenView(kept, valid)
            self._decode_kept[stage.index] = valid
            pruned = self._view.prefill(self._prompt_length)
            kept_state = None if prompt.state is None else self.adapter.spec.gather_state(prompt.state, pruned)
            masks = layer_masks(self.adapter, self._layer_types, stage.start, stage.end, gathered, valid, cache,
                                kept_state)
        return ForwardPlan(masks=masks, gather_index=kept, hidden_states=gathered, pruned=pruned)

    def _record(self, stage: StageRunner, selection: Selection, positions: torch.Tensor, kept: torch.Tensor,
                kept_counts: list[int], select_ms: float) -> None:
        """Note what `stage` kept (`last_stage_kept`, the request's choice inside generate, its `RequestStats`)."""
        prompt, width = self._prompt, kept.shape[1]
        self.last_stage_kept = [*self.last_stage_kept[:stage.index],
                                [kept[row, width - n:] for row, n in enumerate(kept_counts)]]
        if prompt.choice is not None:
            return
        if self._request is not None:  # inside generate: later full forwards of the call reuse this choice
            self._request.remember(stage.index, [positions[row, k] for row, k in enumerate(selection.kept_vision)],
                                   selection.new_states)
        note_stage(self.requests, stage.index, prompt, [int(k.numel()) for k in selection.kept_vision], select_ms)

    def _select(self, stage: StageRunner, hidden: torch.Tensor, vision: torch.Tensor, attention: torch.Tensor,
                input_ids: torch.Tensor) -> tuple[Selection, float]:
        """The stage method's selection on its input (and the ms spent capturing the vision tower's attention)."""
        view = self._view
        saliency, vision_keys, capture_ms = self._vision_saliency(vision) if stage.index == 0 else (None, None, 0.0)
        selection = stage.select(SelectionContext(
            hidden_states=hidden, vision_mask=vision, attention_mask=attention, input_ids=input_ids,
            budgets=[stage.config.budget_for(n) for n in vision.sum(1).tolist()],
            final_norm=self.adapter.text_model.norm,
            image_grids=self._prompt.grids if view is None else None,  # grids hold original positions
            prompt=self._prompt.inputs_for(stage.method), positions=None if view is None else view.index,
            vision_saliency=saliency, vision_keys=vision_keys))
        return selection, capture_ms

    def _reused_selection(self, stage: StageRunner, positions: torch.Tensor, vision: torch.Tensor) -> Selection:
        """The continued request's choice at `stage`, in this call's slots; what this call captured is dropped."""
        stage.drop_capture()
        if stage.index == 0 and self._vision is not None:
            self._vision.clear()
        return self._prompt.choice.selection(stage.index, positions, vision)

    def _vision_saliency(self, vision: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(saliency [B, N], keys [B, N, d], capture ms) of the vision tower's run for this prefill, if the first
        stage's method reads them; the capture is emptied, so a later prefill never sees this one's."""
        if self._vision is None:
            return None, None, 0.0
        run, capture_ms = self._vision.take()
        if not run.attention:
            raise RuntimeError(f"method {self.config.method!r} needs the vision tower's attention, but the tower did "
                               "not run for this prefill (image features passed in precomputed?)")
        saliency, keys = self.adapter.spec.vision_saliency(self.model.config, run, self._prompt.input_ids, vision)
        return saliency, keys, capture_ms

    # -- decode ----------------------------------------------------------------------------------
    def _decode_plan(self, stage: StageRunner, hidden: torch.Tensor, cache: Any) -> ForwardPlan | None:
        kept_2d = self._decode_kept[stage.index] if self._decode_kept else None
        if kept_2d is None:
            return None  # this stage kept the whole prompt: its layers need nothing
        n_appended = cache.get_seq_length(stage.start) + hidden.shape[1] - kept_2d.shape[1]
        mask_2d = decode_mask_2d(kept_2d, self._attention_2d, self._prompt_length, n_appended)
        return ForwardPlan(masks=layer_masks(self.adapter, self._layer_types, stage.start, stage.end, hidden, mask_2d,
                                             cache))

    def _current_prefill(self) -> PrunedPrefill | None:
        """The pruning of the stage now running, in original positions, for the family's extra hooks (None in
        decode or unpruned)."""
        return None if self._plan is None else self._plan.pruned

