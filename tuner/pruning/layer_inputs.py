"""What the pruning hooks give the layers besides the gathered states: positions, masks and rotary tables.

Pure functions of the family adapter and the call, so `tuner.pruning.hooks` keeps only the hook mechanics.
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.models.compat import positions_from_mask
from tuner.models.families import FamilyAdapter


def call_tokens(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The call's input_ids, else its inputs_embeds (None if it has neither)."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if tokens is None else tokens


def number_positions_per_row(adapter: FamilyAdapter, attention_2d: torch.Tensor | None, args: tuple,
                             kwargs: dict) -> tuple[tuple, dict] | None:
    """Give a left-padded call without `position_ids` the positions generate() would give it.

    Left alone, transformers numbers 1-D positions from 0 across the padding. The unpruned model does not
    care (RoPE attention sees relative positions only), but the selection does: the L1 norm of post-RoPE
    keys, which ranks DART's pivots, depends on absolute position, so a padded row would keep another set
    than the same row alone. Families that derive their positions from the mask themselves are left alone.
    """
    if (not adapter.positions_ignore_padding or kwargs.get("position_ids") is not None
            or attention_2d is None or bool(attention_2d.all())):
        return None
    tokens = call_tokens(args, kwargs)
    if tokens is None:
        return None
    kwargs["position_ids"] = positions_from_mask(attention_2d, tokens.shape[1])
    return args, kwargs


def continue_full_positions(adapter: FamilyAdapter, model: torch.nn.Module, args: tuple, kwargs: dict,
                            n_seen: int, attention_2d: torch.Tensor | None) -> None:
    """After a prefill pruned at K = 0 every layer caches only the kept tokens, so a model that numbers new
    tokens from its cache length would restart them too early: give them their full-sequence positions
    (`n_seen`: the tokens of the full sequence before this call)."""
    if kwargs.get("position_ids") is not None:
        return
    tokens = call_tokens(args, kwargs)
    batch, n_query = tokens.shape[:2]
    full = attention_2d
    if full is None:
        full = torch.ones(batch, n_seen + n_query, dtype=torch.bool, device=tokens.device)
    kwargs["position_ids"] = adapter.spec.continued_positions(model, positions_from_mask(full, n_query))


def decode_mask_2d(kept_2d: torch.Tensor, attention_2d: torch.Tensor | None, prompt_length: int,
                   n_appended: int) -> torch.Tensor:
    """The [B, kept + appended] padding mask of a decode step against a pruned stage's shorter cache: the kept
    prompt slots (`kept_2d`), then the tokens appended after the prompt's `prompt_length` (from `attention_2d`, the
    call's full-length mask, if it has one)."""
    batch = kept_2d.shape[0]
    if attention_2d is None:
        return torch.cat([kept_2d, kept_2d.new_ones(batch, n_appended)], 1)
    tail = attention_2d[:, prompt_length:]
    if tail.shape != (batch, n_appended):
        raise RuntimeError(f"attention_mask {tuple(attention_2d.shape)} does not continue the pruned prompt of "
                           f"{prompt_length} tokens with {n_appended} new ones")
    return torch.cat([kept_2d, tail], 1)


def layer_masks(adapter: FamilyAdapter, layer_types: list[str], start: int, end: int, hidden: torch.Tensor,
                mask_2d: torch.Tensor, cache: Any, kept_state: Any = None) -> dict[str, Any]:
    """One mask per attention type of layers [start, end), sized against its first layer of that type."""
    mask_2d = None if bool(mask_2d.all()) else mask_2d  # lets sdpa take its is_causal fast path
    masks = {}
    for layer_type in dict.fromkeys(layer_types[start:end]):
        first = layer_types.index(layer_type, start)
        masks[layer_type] = adapter.spec.layer_mask(
            layer_type, config=adapter.text_model.config, hidden=hidden, mask_2d=mask_2d, cache=cache,
            layer_idx=first, kept_state=kept_state)
    return masks


def bind_layer(hook, index: int):
    """A pre-hook for decoder layer `index` that forwards to `hook(index, args, kwargs)`."""

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
        return hook(index, args, kwargs)

    return pre_hook


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather a [B or 1, N, d] table at per-row positions [B, P] -> [B, P, d] (rows copied whole: on CPU several
    times faster than `gather` with an index expanded over d)."""
    table = table.expand(index.shape[0], *table.shape[1:])
    return table[torch.arange(index.shape[0], device=index.device)[:, None], index]
