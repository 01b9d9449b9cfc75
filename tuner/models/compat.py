"""transformers' calling conventions in one place, for every release the package allows (5.23 and newer).

The hooks see a module's raw keyword arguments, before transformers resolves its deprecated aliases, so the
names they read and write are decided here, from the installed release's own signatures, never inline:
- the cache: `past_key_values` until 5.23, `cache` from 5.24 (the old name stays an alias until 5.40), so a
  call may carry either name, a generate() output either attribute;
- the mask builders (`create_causal_mask`, `create_sliding_window_causal_mask`) take the cache under that name;
- position ids: the convention `generate()` uses, numbered from each row's first real token.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

_CACHE_NAMES = ("cache", "past_key_values")  # newest first
CACHE_KWARG: str = next(name for name in _CACHE_NAMES if name in inspect.signature(create_causal_mask).parameters)
"""The keyword under which this transformers release passes the KV cache to models, layers and mask builders."""

_MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache a forward call was given, under either name (callers may still use the deprecated one)."""
    for name in _CACHE_NAMES:
        if (cache := kwargs.get(name)) is not None:
            return cache
    return None


def cache_from_output(output: Any) -> Any | None:
    """The KV cache of a model or generate() output (`.cache` from 5.24, `.past_key_values` before)."""
    for name in _CACHE_NAMES:
        if (cache := getattr(output, name, None)) is not None:
            return cache
    return None


def build_mask(layer_type: str, *, config: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
               cache: Any | None, layer_idx: int) -> Any:
    """The attention mask transformers itself would build for `layer_type` layers from a 2D padding mask."""
    try:
        builder = _MASK_BUILDERS[layer_type]
    except KeyError:
        raise ValueError(f"unsupported attention layer type {layer_type!r}; known: {sorted(_MASK_BUILDERS)}") from None
    return builder(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None,
                   layer_idx=layer_idx, **{CACHE_KWARG: cache})


def positions_from_mask(attention_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Position ids of the last `n_query` tokens, counted from each row's first real token ([B, n_query]).

    The same numbering `generate()` gives a left-padded batch (padding slots get 0), so a row's positions do
    not depend on how much padding its batch put in front of it.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -n_query:]
