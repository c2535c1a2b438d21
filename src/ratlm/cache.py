"""Inference state: one named, preallocated state per layer, all with static shapes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


class CacheOverflowError(ValueError):
    """More tokens than the cache was allocated for."""


@dataclass
class RATState:
    keys: Tensor  # [B, H, C, d] summary key of every completed chunk, rotated by its chunk index
    values: Tensor  # [B, H, C, d] summary value of every completed chunk
    k_run: Tensor  # [B, H, d] fp32 running key state of the current chunk (before RoPE)
    v_run: Tensor  # [B, H, d] fp32 running value state of the current chunk
    seen: int = 0  # tokens consumed so far


@dataclass
class KVState:
    keys: Tensor  # [B, H, N, d] keys after RoPE at their token position
    values: Tensor  # [B, H, N, d]
    seen: int = 0


@dataclass
class WindowState:
    keys: Tensor  # [B, H, W+1, d] ring buffer: position p lives in slot p % (W+1)
    values: Tensor  # [B, H, W+1, d]
    seen: int = 0


@dataclass
class RNNState:
    state: Tensor  # [B, D] fp32 recurrent state
    seen: int = 0


LayerState = RATState | KVState | WindowState | RNNState


def state_nbytes(state: LayerState) -> int:
    return sum(
        getattr(state, f.name).nbytes for f in fields(state) if isinstance(getattr(state, f.name), Tensor)
    )


@dataclass
class ModelCache:
    layers: list[LayerState]
    batch_size: int
    max_len: int

    @property
    def seen(self) -> int:
        """Tokens consumed so far (the position of the next token)."""
        return self.layers[0].seen if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(state_nbytes(s) for s in self.layers)

    def reset(self) -> None:
        """Forget all tokens, keeping the buffers (no reallocation)."""
        for s in self.layers:
            s.seen = 0
            for f in fields(s):
                t = getattr(s, f.name)
                if isinstance(t, Tensor):
                    t.zero_()

    def check_room(self, n_new: int) -> None:
        if self.seen + n_new > self.max_len:
            raise CacheOverflowError(
                f"the cache holds {self.max_len} tokens (max_len); {self.seen} are in it and {n_new} more "
                f"were given. Allocate a larger cache with model.new_cache(batch_size, max_len=...)"
            )


def zeros(shape, device, dtype) -> Tensor:
    return torch.zeros(shape, device=device, dtype=dtype)
