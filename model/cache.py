"""Preallocated per-layer key/value cache that grows geometrically instead of per token."""

from __future__ import annotations

import torch


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
        if self.keys[layer].device != key.device:  # layers split over devices: keep each layer's cache beside it
            self.keys[layer] = self.keys[layer].to(key.device)
            self.values[layer] = self.values[layer].to(key.device)
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
