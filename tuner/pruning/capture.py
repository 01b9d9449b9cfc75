"""Capture layer K-1's post-RoPE keys and attention rows without switching the model to eager.

A registered attention function wraps the configured one (sdpa, eager, flash) and is selected for one
attention module only, through a private copy of that module's config. It sees queries and keys after
RoPE / M-RoPE, so no family-specific rotary code is needed. Soft-capped attention is not modelled.
Attention is recomputed only for the rows asked for: the last query's row, or (`query_rows`) any query rows a
method picks after the layer ran, from the query and key tensors the layer computed anyway.
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tuner.pruning.profiling import step

CAPTURE_IMPLEMENTATION = "dart_tuner_capture"


class AttentionCapture:
    """Records, for each prefill through one attention module, its keys, the last query's attention and/or what
    `attention_rows` needs to give the attention of any query rows."""

    def __init__(self, attention: torch.nn.Module, *, keys: bool, last_row_attention: bool,
                 query_rows: bool = False) -> None:
        self.attention = attention
        self.want_keys = keys
        self.want_last_row = last_row_attention
        self.want_rows = query_rows
        self.keys: torch.Tensor | None = None  # [B, N, H_kv * d]
        self.last_row_attention: torch.Tensor | None = None  # [B, H, N]
        self._raw_keys: torch.Tensor | None = None
        self._rows_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None] | None = None
        self._saved_config = attention.config
        private = copy.copy(attention.config)
        attention._dart_tuner_inner = self._saved_config._attn_implementation or "eager"
        attention._dart_tuner_capture = self
        private._attn_implementation = CAPTURE_IMPLEMENTATION
        attention.config = private

    def remove(self) -> None:
        """Give the module its own config back; the model is exactly as before."""
        self.attention.config = self._saved_config
        for name in ("_dart_tuner_inner", "_dart_tuner_capture"):
            if hasattr(self.attention, name):
                delattr(self.attention, name)
        self.clear()

    def clear(self) -> None:
        """Drop the captured tensors (they are only needed until the selection at layer K)."""
        self._raw_keys = self.keys = self.last_row_attention = self._rows_inputs = None

    def take_keys(self) -> torch.Tensor | None:
        """Keys of the last prefill with heads flattened: [B, H, N, d] -> [B, N, H * d]."""
        if self._raw_keys is None:
            return None
        batch, heads, length, dim = self._raw_keys.shape
        return self._raw_keys.transpose(1, 2).reshape(batch, length, heads * dim)

    def record(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None) -> None:
        """Called by the attention function in prefill; `key` holds exactly the prompt's keys."""
        if self.want_keys:
            self._raw_keys = key
        if self.want_last_row:
            self.last_row_attention = _last_row_attention(query, key, attention_mask, scaling)
        if self.want_rows:  # references only: the rows are computed once a method has chosen them
            self._rows_inputs = (query, key, attention_mask, scaling)

    def attention_rows(self, row: int, queries: torch.Tensor) -> torch.Tensor:
        """The last prefill's attention of batch row `row`'s query slots `queries` [R] over its keys: [H, R, N].

        Exactly the softmax the layer computed (causal, padding and any mask the model built), in float32.
        """
        if self._rows_inputs is None:
            raise RuntimeError("no prefill was captured for attention_rows")
        query, key, mask, scaling = self._rows_inputs
        queries = queries.to(query.device, torch.long)
        q = query[row, :, queries].float()  # [H, R, d]
        k = key[row].float()
        if k.shape[0] != q.shape[0]:  # grouped-query attention: share each KV head across its query heads
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        n = k.shape[-2]
        if mask is not None:
            mask = mask[min(row, mask.shape[0] - 1)]  # a mask shared by the batch has batch size 1
        if mask is None or mask.dim() == 2:  # sdpa's causal fast path, or flash's 2D padding mask
            allowed = torch.arange(n, device=q.device)[None] <= queries[:, None]
            if mask is not None:
                allowed = allowed & mask[None, :n].bool()
            scores = scores.masked_fill(~allowed[None], float("-inf"))
        elif mask.dtype == torch.bool:  # sdpa: True = attend
            scores = scores.masked_fill(~mask[:, queries, :n], float("-inf"))
        else:  # eager: additive
            scores = scores + mask[:, queries, :n].float()
        return scores.softmax(-1)


def _last_row_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                        scaling: float | None) -> torch.Tensor:
    """softmax(q_last k^T * scale) over the keys, per head: [B, H, N]; O(N d), not O(N^2 d)."""
    q = query[:, :, -1:, :].float()
    k = key.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each KV head across its query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        n = k.shape[-2]
        if mask.dim() == 2:  # flash attention gets the 2D padding mask
            scores = scores.masked_fill(~mask[:, None, None, :n].bool(), float("-inf"))
        elif mask.dtype == torch.bool:  # sdpa: True = attend
            scores = scores.masked_fill(~mask[..., -1:, :n], float("-inf"))
        else:  # eager: additive
            scores = scores + mask[..., -1:, :n].float()
    return scores.softmax(-1)[:, :, 0, :]


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """Attention function: record in prefill, then run the module's real implementation unchanged."""
    q_len = query.shape[2]
    capture = getattr(module, "_dart_tuner_capture", None)
    if capture is not None and q_len > 1:
        # Prefill: the cache held nothing before, so the first q_len key slots are the prompt's keys
        # (a static cache returns its whole buffer here).
        with step("capture"):
            capture.record(query, key[:, :, :q_len], attention_mask, scaling)
    inner = module._dart_tuner_inner
    if inner == "eager":
        implementation = sys.modules[type(module).__module__].eager_attention_forward
    else:
        implementation = ALL_ATTENTION_FUNCTIONS[inner]
    return implementation(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
