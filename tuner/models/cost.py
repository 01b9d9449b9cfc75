"""Analytic prefill FLOPs and KV-cache bytes of a pruned prefill, from the text model's config.

A second column beside measured latency, never a substitute for it. A multiply-add counts as 2 FLOPs.
Per layer and n tokens: the q/k/v/o projections (grouped KV heads), causal attention over n(n+1)/2
query-key pairs (scores and weighted values; a sliding-window layer of window W sees at most W keys per
query), and the MLP (gated: 3 matrices, else 2). Layers below K
see all N prompt tokens, layers from K on the P kept ones; the LM head runs on the last token only.
A schedule of stages at K_0 < K_1 < ... keeping P_0 >= P_1 >= ... tokens: layers in [K_i, K_{i+1}) see P_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextDims:
    """The sizes of a decoder stack that its cost depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True
    windows: tuple[int | None, ...] = ()  # per layer: the sliding window, None for full attention; () = all full

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    @classmethod
    def from_config(cls, config) -> TextDims:
        """Read a decoder's transformers config: the standard field names every supported text model uses.

        For a VLM, ask its family (`Family.text_dims`), which knows where the text config is and what
        differs; here a config with `get_text_config()` is read through it.
        """
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layer_types = getattr(text, "layer_types", None) or []
        windows = tuple(text.sliding_window if kind == "sliding_attention" else None for kind in layer_types)
        return cls(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                   heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=text.vocab_size,  # every supported family (Llama, Qwen2) has a gated MLP
                   windows=windows if any(w is not None for w in windows) else ())


def layer_flops(dims: TextDims, n_tokens: int, window: int | None = None) -> int:
    """FLOPs of one decoder layer over a causal prefill of n tokens (each query sees at most `window` keys)."""
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    projections = 2 * n_tokens * dims.hidden * (2 * q_out + 2 * kv_out)
    if window is None or n_tokens <= window:
        pairs = n_tokens * (n_tokens + 1) // 2
    else:
        pairs = window * (window + 1) // 2 + (n_tokens - window) * window
    attention = 2 * 2 * dims.heads * dims.head_dim * pairs
    mlp = 2 * n_tokens * dims.hidden * dims.intermediate * (3 if dims.gated_mlp else 2)
    return projections + attention + mlp


def tokens_per_layer(dims: TextDims, n_tokens: int, kept_tokens: int | Sequence[int] | None = None,
                     layer: int | Sequence[int] = 0) -> list[int]:
    """Tokens each decoder layer sees: N below the first stage, then P_i in the layers [K_i, K_{i+1}).

    `kept_tokens` and `layer` are one stage's (P, K) or every stage's, first to last (P_i, K_i).
    """
    kept = [n_tokens] if kept_tokens is None else \
        [kept_tokens] if isinstance(kept_tokens, int) else list(kept_tokens)
    layers = [layer] if isinstance(layer, int) else list(layer)
    if kept_tokens is None:
        layers = layers[:1]
    _check(dims, n_tokens, kept, layers)
    seen = [n_tokens] * dims.layers
    for stage_layer, stage_kept in zip(layers, kept):
        seen[stage_layer:] = [stage_kept] * (dims.layers - stage_layer)
    return seen


def prefill_flops(dims: TextDims, n_tokens: int, kept_tokens: int | Sequence[int] | None = None,
                  layer: int | Sequence[int] = 0) -> int:
    """FLOPs of the text model's prefill when layers >= `layer` see only `kept_tokens` of `n_tokens` (per stage
    when both are sequences: `tokens_per_layer`)."""
    seen = tokens_per_layer(dims, n_tokens, kept_tokens, layer)
    return sum(layer_flops(dims, tokens, dims.window(index)) for index, tokens in enumerate(seen)) \
        + 2 * dims.hidden * dims.vocab


def kv_cache_bytes(dims: TextDims, n_tokens: int, kept_tokens: int | Sequence[int] | None = None,
                   layer: int | Sequence[int] = 0, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of keys and values after the prefill: each layer holds the tokens it saw (`tokens_per_layer`).

    A sliding-window layer of window W keeps at most its last W - 1 tokens, as transformers' sliding cache does.
    """
    per_token = 2 * dims.kv_heads * dims.head_dim * torch.empty((), dtype=dtype).element_size()
    seen = tokens_per_layer(dims, n_tokens, kept_tokens, layer)
    return per_token * sum(tokens if dims.window(index) is None else min(tokens, dims.window(index) - 1)
                           for index, tokens in enumerate(seen))


def _check(dims: TextDims, n_tokens: int, kept: list[int], layers: list[int]) -> None:
    """Stages as many as their kept counts, layers strictly increasing in 0..L, counts non-increasing in 0..N."""
    if len(kept) != len(layers):
        raise ValueError(f"give one kept count per stage layer, got {len(kept)} counts for layers {layers}")
    for previous, count in zip([n_tokens, *kept], kept):
        if not 0 <= count <= previous:
            raise ValueError(f"kept_tokens must be in 0..{previous} (each stage keeps at most what the one before "
                             f"it kept), got {count}")
    for previous, layer in zip([-1, *layers], layers):
        if not previous < layer <= dims.layers:
            raise ValueError(f"layer must be in {previous + 1}..{dims.layers} (stage layers strictly increasing), "
                             f"got {layer}")
