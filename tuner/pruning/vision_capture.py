"""Capture a vision-tower layer's attention saliency and keys without switching the tower to eager (`visionzip`).

The same mechanism as `tuner.pruning.capture`: the one attention module gets a private config copy selecting the
capture function, which records and then runs the configured implementation (sdpa, eager, flash) unchanged.
Each call records, per sequence, the attention of the CLS query ("cls") or the attention each key receives
averaged over all queries ("mean"), averaged over heads, and the keys averaged over heads (VisionZip's metric).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tuner.models.families.base import VisionAttention, VisionTowerRun
from tuner.pruning.capture import AttentionCapture

QUERY_CHUNK = 1024  # queries per softmax block of the "mean" reduction: bounds memory at chunk x keys x heads
SALIENCY_QUERIES = ("cls", "mean")


class VisionAttentionCapture(AttentionCapture):
    """Records every call of one vision attention module (and the keyword arguments of every call of `tower`, if
    given) until `take()`; `elapsed_ms` is the time spent recording."""

    def __init__(self, attention: torch.nn.Module, query: str, tower: torch.nn.Module | None = None) -> None:
        if query not in SALIENCY_QUERIES:
            raise ValueError(f"vision saliency query must be one of {SALIENCY_QUERIES}, got {query!r}")
        self.query = query
        self.records: list[VisionAttention] = []
        self.tower_calls: list[dict[str, Any]] = []
        self.elapsed_ms = 0.0
        super().__init__(attention, keys=False, last_row_attention=False)
        self._tower_hook = None if tower is None else tower.register_forward_pre_hook(
            lambda module, args, kwargs: self.tower_calls.append(dict(kwargs)), with_kwargs=True)

    def remove(self) -> None:
        """Restore the attention module and drop the tower hook (safe to call twice)."""
        if self._tower_hook is not None:
            self._tower_hook.remove()
            self._tower_hook = None
        super().remove()

    def clear(self) -> None:
        """Forget what was recorded (a new prefill's vision tower run starts afresh)."""
        super().clear()
        self.records, self.tower_calls = [], []
        self.elapsed_ms = 0.0

    def take(self) -> tuple[VisionTowerRun, float]:
        """(what was recorded since the last take, the milliseconds spent recording it), then clear."""
        out = (VisionTowerRun(attention=self.records, tower_calls=self.tower_calls), self.elapsed_ms)
        self.clear()
        return out

    def record(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            saliency = attention_saliency(query, key, attention_mask, scaling, self.query)
            self.records.append(VisionAttention(saliency=saliency, keys=key.float().mean(1)))
        if query.is_cuda:
            torch.cuda.synchronize(query.device)
        self.elapsed_ms += (time.perf_counter() - started) * 1e3


def attention_saliency(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
                       which: str) -> torch.Tensor:
    """softmax(q k^T * scale + mask) reduced to [B, N_k]: row 0 ("cls") or the mean over queries ("mean"), mean
    over heads; the queries go in blocks so the full [N_q, N_k] matrix of every head never exists at once."""
    q, k = query.float(), key.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    rows = range(0, 1) if which == "cls" else range(0, q.shape[2], QUERY_CHUNK)
    total = q.new_zeros(q.shape[0], k.shape[2])
    for start in rows:
        stop = start + 1 if which == "cls" else start + QUERY_CHUNK
        scores = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale
        if mask is not None and mask.dim() == 4:
            block = mask[:, :, start:stop, :k.shape[2]]
            scores = scores.masked_fill(~block, float("-inf")) if block.dtype == torch.bool else scores + block.float()
        total += scores.softmax(-1).sum(2).mean(1)
    return total if which == "cls" else total / q.shape[2]
