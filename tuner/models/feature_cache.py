"""A per-worker cache of a VLM's image features (vision tower + projector output): exact, bounded in bytes, LRU.

Pruning acts inside the decoder, after the image features are made, so every trial of a study computes the same
features for the same document. `FeatureCache.attach(model, family)` wraps the one method that makes them
(`Family.image_features_method` of `Family.image_features_owner(model)`; `get_image_features` of the inner
model in transformers 5, which both `generate` and the forward call) with an instance attribute that `remove()`
deletes again; no class is patched. The key is a SHA-256 digest of every argument of the call: tensors by dtype,
shape, device and bytes (pixel values, `image_sizes`, `image_grid_thw`, ...), everything else by type and value
(`vision_feature_layer`, `return_dict`, ...). A call with an argument that cannot be digested that way, with
gradients enabled, with the module in training mode or while pruning reads the vision tower's attention
(`NEEDS_VISION_TOWER` set on the module: a cached answer would skip the tower) is passed through uncounted in
hits and misses.

A hit returns a fresh copy of the stored output (the same `ModelOutput`, tuple and list types, tensors with
the same bytes on the same device): `generate` rewrites `pooler_output` in place when it expands a batch for
beams, so handing out the stored object would let one call change what the next one gets. Entries are kept on
the CPU, so the bound is host memory, and the features never take accelerator memory between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import struct
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from tuner.models.families.base import Family

NEEDS_VISION_TOWER = "_dart_tuner_needs_vision_tower"
"""Attribute that, while true on the features' owner module, makes every call run the vision tower (bypassed)."""
MB = 2 ** 20
DEFAULT_FEATURE_CACHE_MB = 2048
"""The default bound: ~330 LLaVA-1.5-7B images in fp16 (576 x 4096 projected + one CLIP layer, ~6 MB each)."""


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made (hits, misses, evictions, passed-through calls) and what it holds now."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bypassed: int = 0
    entries: int = 0
    bytes: int = 0

    def __sub__(self, earlier: CacheStats) -> CacheStats:
        """The counters since `earlier`; entries and bytes stay those of `self`."""
        return dataclasses.replace(self, hits=self.hits - earlier.hits, misses=self.misses - earlier.misses,
                                   evictions=self.evictions - earlier.evictions,
                                   bypassed=self.bypassed - earlier.bypassed)

    def to_attrs(self, prefix: str = "feature_cache_") -> dict[str, int]:
        """Flat name -> count, e.g. for a trial's user attributes."""
        return {f"{prefix}{key}": value for key, value in dataclasses.asdict(self).items()}

    def describe(self, max_bytes: int) -> str:
        """One line for a person: hits, misses, evictions, size against the bound."""
        calls = self.hits + self.misses
        rate = f" ({self.hits / calls:.0%} hits)" if calls else ""
        return (f"{self.hits} hits, {self.misses} misses{rate}, {self.evictions} evictions, {self.entries} entries "
                f"in {self.bytes / MB:.1f} of {max_bytes / MB:.0f} MB")


class _Undigestable(Exception):
    """An argument whose value cannot be reduced to bytes exactly (the call is passed through)."""


class _Unstorable(Exception):
    """An output holding a value that cannot be copied exactly (it is returned, not stored)."""


def _feed(h: Any, value: Any) -> None:
    """Add `value` to hash `h` unambiguously: a type tag, then its dtype/shape/device and bytes, or its value."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.is_sparse or value.layout != torch.strided:
            raise _Undigestable(f"tensor on {value.device} with layout {value.layout}")
        h.update(f"T{value.dtype}|{tuple(value.shape)}|{value.device}|".encode())
        flat = value.detach().reshape(-1).contiguous().cpu()
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    elif value is None or isinstance(value, (bool, int, str)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, float):
        h.update(b"float:" + struct.pack("<d", value))
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, dict):
        h.update(f"dict[{len(value)}]".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value};".encode())
    else:
        raise _Undigestable(type(value).__name__)


def digest(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> bytes:
    """SHA-256 over every argument of one call, by name; raises `_Undigestable` for values it cannot reduce."""
    bound = signature.bind(*args, **kwargs)
    h = hashlib.sha256()
    _feed(h, dict(bound.arguments))
    return h.digest()


@dataclass(frozen=True)
class _Saved:
    """A stored tensor (on the CPU) and the device it is handed back on."""

    tensor: torch.Tensor
    device: torch.device


def _map(value: Any, on_tensor: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """`value` rebuilt with new containers of the same types, `on_tensor` applied to each tensor (or `_Saved`).

    A tensor that appears twice (`last_hidden_state` is often `hidden_states[-1]`) is converted once and stays
    one object in the result. Raises `_Unstorable` for a value it cannot rebuild exactly.
    """
    if isinstance(value, (torch.Tensor, _Saved)):
        if id(value) not in memo:
            memo[id(value)] = on_tensor(value)
        return memo[id(value)]
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if type(value) is dict:
        return {key: _map(item, on_tensor, memo) for key, item in value.items()}
    if isinstance(value, ModelOutput):  # rebuilt from its set fields; the unset ones default to None
        return type(value)(**{key: _map(item, on_tensor, memo) for key, item in value.items()})
    if type(value) in (list, tuple):
        return type(value)(_map(item, on_tensor, memo) for item in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map(item, on_tensor, memo) for item in value))
    raise _Unstorable(type(value).__name__)


def _save(tensor: torch.Tensor) -> _Saved:
    return _Saved(tensor.detach().to("cpu", copy=True), tensor.device)


def _restore(saved: _Saved) -> torch.Tensor:
    return saved.tensor.to(saved.device, copy=True)


class FeatureCache:
    """Image features by exact input digest, least recently used first out once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 turns the cache off), got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._stats = CacheStats()
        self._owner: weakref.ref | None = None

    @classmethod
    def from_mb(cls, megabytes: float) -> FeatureCache | None:
        """A cache bounded at `megabytes` MiB, or None for 0 (off)."""
        if megabytes < 0:
            raise ValueError(f"the feature cache size must be >= 0 MB (0 = off), got {megabytes}")
        return cls(int(megabytes * MB)) if megabytes else None

    def stats(self) -> CacheStats:
        """The counters so far and the current size."""
        return dataclasses.replace(self._stats, entries=len(self._entries),
                                   bytes=sum(size for _, size in self._entries.values()))

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()

    def attach(self, model: torch.nn.Module, family: Family) -> AttachedCache:
        """Serve `model`'s image features from this cache until `remove()` (also a context manager)."""
        owner = family.image_features_owner(model)
        if self._owner is not None and self._owner() is not None and self._owner() is not owner:
            raise ValueError("this FeatureCache holds another model's features; use one cache per model")
        self._owner = weakref.ref(owner)
        return AttachedCache(self, owner, family.image_features_method)

    # -- the store ----------------------------------------------------------------------------------------------
    def _count(self, **increments: int) -> None:
        self._stats = dataclasses.replace(
            self._stats, **{key: getattr(self._stats, key) + n for key, n in increments.items()})

    def _lookup(self, key: bytes) -> Any | None:
        """A fresh copy of the output stored under `key`, marked most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return _map(entry[0], _restore, {})

    def _store(self, key: bytes, output: Any) -> None:
        """Keep a CPU copy of `output`, then evict the least recently used entries until within the bound."""
        saved: dict[int, Any] = {}
        try:
            stored = _map(output, _save, saved)
        except _Unstorable:
            return
        size = sum(item.tensor.untyped_storage().nbytes() for item in saved.values())
        if size > self.max_bytes:
            return  # one entry larger than the whole cache: not kept
        self._entries[key] = (stored, size)
        total = sum(s for _, s in self._entries.values())
        while total > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            total -= evicted
            self._count(evictions=1)

    def call(self, method: Callable[..., Any], signature: inspect.Signature, owner: torch.nn.Module,
             args: tuple, kwargs: dict[str, Any]) -> Any:
        """`method(*args, **kwargs)`, from the cache when the same arguments were seen before."""
        if torch.is_grad_enabled() or owner.training or getattr(owner, NEEDS_VISION_TOWER, False):
            self._count(bypassed=1)
            return method(*args, **kwargs)
        try:
            key = digest(signature, args, kwargs)
        except (_Undigestable, TypeError):  # TypeError: arguments the method itself will reject
            self._count(bypassed=1)
            return method(*args, **kwargs)
        cached = self._lookup(key)
        if cached is not None:
            self._count(hits=1)
            return cached
        output = method(*args, **kwargs)
        self._count(misses=1)
        self._store(key, output)
        return output


class AttachedCache:
    """A `FeatureCache` serving one module's feature method; `remove()` (or leaving the `with`) detaches it."""

    def __init__(self, cache: FeatureCache, owner: torch.nn.Module, method_name: str) -> None:
        method = getattr(owner, method_name, None)
        if not callable(method):
            raise ValueError(f"{type(owner).__name__} has no {method_name}() to cache image features through "
                             "(set the family's image_features_owner / image_features_method)")
        if method_name in vars(owner):
            raise ValueError(f"{type(owner).__name__}.{method_name} is already wrapped (a cache is attached)")
        self.owner, self.method_name = owner, method_name
        signature = inspect.signature(method)

        @functools.wraps(method)  # keeps the signature: generate() picks the arguments it passes from it
        def cached(*args: Any, **kwargs: Any) -> Any:
            return cache.call(method, signature, owner, args, kwargs)

        setattr(owner, method_name, cached)
        self._wrapper = cached

    def remove(self) -> None:
        """Restore the module's own method (idempotent)."""
        if vars(self.owner).get(self.method_name) is self._wrapper:
            delattr(self.owner, self.method_name)

    def __enter__(self) -> AttachedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
