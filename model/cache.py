"""Preallocated per-layer key/value cache that grows geometrically instead of per token, and the engine's store
of finished sequences' keys and values for prompts that start the same way."""

from __future__ import annotations

import collections

import torch


def follow_device(cache, layer: int, device: torch.device) -> None:
    """Layers split over devices: keep each layer's keys and values on the device that layer runs on."""
    if cache.keys[layer].device != device:
        cache.keys[layer] = cache.keys[layer].to(device)
        cache.values[layer] = cache.values[layer].to(device)


class KVCache:
    """Keys (after rotary) and values of every layer, stored as (batch, kv_heads, capacity, head_dim).

    `cache[i]` gives layer i's (key, value) in the reference layout (seq, batch, kv_heads, head_dim), so code
    written for the original `past_key_values` (e.g. `past_key_values[0][0].shape[0]`) keeps working.
    """

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256, max_capacity: int | None = None):
        self.num_layers = num_layers
        self.max_capacity = max_capacity
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # positions filled in every layer

    @classmethod
    def for_model(cls, config, batch_size: int, dtype: torch.dtype, device, capacity: int = 256) -> "KVCache":
        return cls(config.num_layers, batch_size, config.num_kv_heads, config.kv_channels, dtype, device,
                   capacity=min(capacity, config.seq_length), max_capacity=config.seq_length)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, new_tokens: int) -> None:
        """Make room for new_tokens more positions (doubling, so appends are amortised O(1))."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        if self.max_capacity is not None and need > self.max_capacity:
            raise ValueError(f"context of {need} tokens exceeds the model's limit of {self.max_capacity}")
        new_cap = max(need, 2 * self.capacity)
        if self.max_capacity is not None:
            new_cap = min(new_cap, self.max_capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty(old.shape[:2] + (new_cap,) + old.shape[3:])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, g, T, d) key/value at the current end; return layer's keys/values up to and including them."""
        end = self.length + key.shape[2]
        follow_device(self, layer, key.device)
        self.keys[layer][:, :, self.length:end] = key
        self.values[layer][:, :, self.length:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys[layer][:, :, : self.length].permute(2, 0, 1, 3)
        v = self.values[layer][:, :, : self.length].permute(2, 0, 1, 3)
        return k, v

    def __iter__(self):
        return (self[i] for i in range(self.num_layers))


class BatchCache:
    """The cache of up to max_batch sequences decoded together, each at its own length.

    Rows 0..rows-1 are in use; row r holds its sequence at positions 0..lengths[r]-1. A decode step feeds one
    token per row: update() writes each row's key at that row's own length, and the caller masks every key
    past it. Storage starts zeroed (masked slots must never hold NaN) and grows geometrically; release()
    shrinks it back when nothing runs, so memory stays bounded however many requests pass through.
    """

    def __init__(self, config, max_batch: int, dtype: torch.dtype, device, capacity: int = 256, fixed: bool = False):
        self.num_layers = config.num_layers
        self.fixed = fixed  # allocated once at `capacity`: never grows, shrinks or moves; steps attend over all of it
        self.initial_capacity = min(capacity, config.seq_length)
        self.max_capacity = self.initial_capacity if fixed else config.seq_length
        self._shape = (max_batch, config.num_kv_heads, config.kv_channels)
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths = [0] * max_batch
        self.rows = 0
        self._index: dict = {}  # device -> this step's write index (see _write_index)
        self._allocate(self.initial_capacity)

    def _allocate(self, capacity: int) -> None:
        b, g, d = self._shape
        self.keys = [torch.zeros(b, g, capacity, d, dtype=self.dtype, device=self.device)
                     for _ in range(self.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def max_batch(self) -> int:
        return self._shape[0]

    @property
    def length(self) -> int:
        return max(self.lengths[: self.rows], default=0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def grow(self, need: int) -> None:
        """Make every row able to hold `need` positions."""
        if need <= self.capacity:
            return
        if need > self.max_capacity:
            limit = "this engine's fixed cache" if self.fixed else "the model's limit"
            raise ValueError(f"context of {need} tokens exceeds {limit} of {self.max_capacity}")
        new_cap = min(max(need, 2 * self.capacity), self.max_capacity)
        keep = self.length if self.rows else 0
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
                grown[:, :, :keep] = old[:, :, :keep]
                store[i] = grown

    def release(self) -> None:
        """With no rows in use, give back storage grown beyond the initial capacity."""
        if self.rows == 0 and self.capacity > self.initial_capacity:
            self._allocate(self.initial_capacity)

    def add_row(self) -> "RowCache":
        """Claim the next free row (empty) and return a single-sequence view for prefilling it."""
        if self.rows >= self.max_batch:
            raise RuntimeError("no free row in the batch cache")
        row = self.rows
        self.rows += 1
        self.lengths[row] = 0
        return RowCache(self, row)

    def adopt(self, source: "KVCache", row: int = 0, gap: tuple[int, int] = (0, 0)) -> int:
        """Claim the next free row and copy row `row` of a cache filled elsewhere into it: a batch-1 prompt, or
        one prompt of a left-padded batch. gap = (at, count): `count` positions from `at` on (that row's padding,
        after a P-Tuning prefix) are left out, so the row holds only its own positions, as if read alone."""
        at, count = gap
        n = source.length - count
        self.grow(n)
        dest = self.add_row().row
        for store, stored in ((self.keys, source.keys), (self.values, source.values)):
            for t, s in zip(store, stored):
                t[dest, :, :at] = s[row, :, :at].to(t.device)
                t[dest, :, at:n] = s[row, :, at + count:source.length].to(t.device)
        self.lengths[dest] = n
        return dest

    def remove_row(self, row: int) -> None:
        """Free a row; the last row moves into its place, so rows in use stay 0..rows-1."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for store in (self.keys, self.values):
                for t in store:
                    t[row, :, :n] = t[last, :, :n]
            self.lengths[row] = n
        self.lengths[last] = 0
        self.rows = last

    # ---- the interface the model uses during a batched decode step (one new token per row) -------------
    def reserve(self, new_tokens: int) -> None:
        """Called by the model at the start of every step: room for it, and a fresh write index."""
        self.grow(self.length + new_tokens)
        self._index = {}

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key.shape[2] != 1 or key.shape[0] != self.rows:
            raise ValueError("a batched step feeds exactly one token for every row in use")
        follow_device(self, layer, key.device)
        rows, at = self._write_index(key.device)
        self.keys[layer][rows, :, at] = key[:, :, 0]
        self.values[layer][rows, :, at] = value[:, :, 0]
        end = self.capacity if self.fixed else self.length + 1  # fixed: the same shapes every step
        return self.keys[layer][: self.rows, :, :end], self.values[layer][: self.rows, :, :end]

    def _write_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) where this step's keys go: built once per step and device, not once per layer."""
        index = self._index.get(device)
        if index is None:
            index = self._index[device] = (torch.arange(self.rows, device=device),
                                           torch.tensor(self.lengths[: self.rows], device=device))
        return index

    def advance(self, tokens: int) -> None:
        for r in range(self.rows):
            self.lengths[r] += tokens

    def step_mask(self) -> torch.Tensor:
        """(rows, 1, 1, S) bool for the next step: row r sees its own keys and the one being added."""
        lengths = torch.tensor(self.lengths[: self.rows], device=self.device)
        width = self.capacity if self.fixed else self.length + 1
        return (torch.arange(width, device=self.device)[None, :] <= lengths[:, None])[:, None, None, :]


class RowCache:
    """One row of a BatchCache seen as a batch-1 cache, for prefilling a sequence into its row."""

    def __init__(self, batch: BatchCache, row: int):
        self.batch, self.row = batch, row

    batch_size = 1

    @property
    def length(self) -> int:
        return self.batch.lengths[self.row]

    def reserve(self, new_tokens: int) -> None:
        self.batch.grow(self.length + new_tokens)

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, r, start = self.batch, self.row, self.length
        end = start + key.shape[2]
        follow_device(b, layer, key.device)
        b.keys[layer][r:r + 1, :, start:end] = key
        b.values[layer][r:r + 1, :, start:end] = value
        return b.keys[layer][r:r + 1, :, :end], b.values[layer][r:r + 1, :, :end]

    def advance(self, tokens: int) -> None:
        self.batch.lengths[self.row] += tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixStore:
    """Keys and values of finished sequences (prompt and reply), kept so that a later prompt that starts with the
    same ids (the next turn of a conversation re-sends it whole; Regenerate sends the same prompt again; clients
    share a system prompt or tool list) reads only what follows. At most `budget` token positions in all, least
    recently used first out. An entry's positions 0..prefix-1 hold a P-Tuning prefix, as every row does."""

    def __init__(self, budget: int, prefix: int = 0):
        self.budget, self.prefix = budget, prefix
        self._entries: collections.OrderedDict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = \
            collections.OrderedDict()
        self._next_key = 0
        self.tokens = 0  # positions held, for the budget

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, ids: list[int], cache: BatchCache, row: int) -> None:
        """Copy row `row` of a batch cache, whose positions after the prefix hold `ids`."""
        n = len(ids)
        if n > self.budget or n == 0:
            return
        for key, (stored, _, _) in list(self._entries.items()):  # superseded: the new one starts with it
            if len(stored) <= n and ids[: len(stored)] == stored:
                self._drop(key)
        while self.tokens + n > self.budget:
            self._drop(next(iter(self._entries)))
        end = self.prefix + n
        keys = [k[row, :, :end].clone() for k in cache.keys]
        values = [v[row, :, :end].clone() for v in cache.values]
        self._entries[self._next_key] = (list(ids), keys, values)
        self._next_key += 1
        self.tokens += n

    def _drop(self, key: int) -> None:
        ids, _, _ = self._entries.pop(key)
        self.tokens -= len(ids)

    def match(self, ids: list[int]) -> tuple[int | None, int]:
        """(entry, n): the entry sharing the most leading ids with `ids` and how many, at most len(ids) - 1 (the
        last prompt token is always read: its logits choose the first new token); (None, 0) if none shares any."""
        best, best_n = None, 0
        for key, (stored, _, _) in self._entries.items():
            n = min(common_prefix(stored, ids), len(ids) - 1)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def restore(self, key: int, n: int, cache: KVCache) -> None:
        """Fill a batch-1 cache with the entry's prefix and first n tokens (its length becomes prefix + n)."""
        _, keys, values = self._entries[key]
        self._entries.move_to_end(key)
        end = self.prefix + n
        cache.reserve(end - cache.length)
        for dest, src in ((cache.keys, keys), (cache.values, values)):
            for i, s in enumerate(src):
                dest[i][0, :, :end] = s[:, :end].to(dest[i].device)
        cache.length = end
