"""Analytic prefill FLOPs and KV-cache bytes of a pruned prefill, from the text model's config.

A second column beside measured latency, never a substitute for it. A multiply-add counts as 2 FLOPs.
Per layer and n tokens: the q/k/v/o projections (grouped KV heads), causal attention over n(n+1)/2
query-key pairs (scores and weighted values; a sliding-window layer of window W sees at most W keys per
query), and the MLP (gated: 3 matrices, else 2). Layers below K
see all N prompt tokens, layers from K on the P kept ones; the LM head runs on the last token only.
"""

from __future__ import annotations

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


def prefill_flops(dims: TextDims, n_tokens: int, kept_tokens: int | None = None, layer: int = 0) -> int:
    """FLOPs of the text model's prefill when layers >= `layer` see only `kept_tokens` of `n_tokens`."""
    kept = n_tokens if kept_tokens is None else kept_tokens
    _check(dims, n_tokens, kept, layer)
    per_layer = (layer_flops(dims, n_tokens if index < layer else kept, dims.window(index))
                 for index in range(dims.layers))
    return sum(per_layer) + 2 * dims.hidden * dims.vocab


def kv_cache_bytes(dims: TextDims, n_tokens: int, kept_tokens: int | None = None, layer: int = 0,
                   dtype: torch.dtype = torch.float16) -> int:
    """Bytes of keys and values after the prefill: N tokens in layers < K, P tokens in layers >= K.

    A sliding-window layer of window W keeps at most its last W - 1 tokens, as transformers' sliding cache does.
    """
    kept = n_tokens if kept_tokens is None else kept_tokens
    _check(dims, n_tokens, kept, layer)
    per_token = 2 * dims.kv_heads * dims.head_dim * torch.empty((), dtype=dtype).element_size()
    held = 0
    for index in range(dims.layers):
        tokens, window = (n_tokens if index < layer else kept), dims.window(index)
        held += tokens if window is None else min(tokens, window - 1)
    return per_token * held


def _check(dims: TextDims, n_tokens: int, kept: int, layer: int) -> None:
    if not 0 <= kept <= n_tokens:
        raise ValueError(f"kept_tokens must be in 0..{n_tokens}, got {kept}")
    if not 0 <= layer <= dims.layers:
        raise ValueError(f"layer must be in 0..{dims.layers}, got {layer}")
