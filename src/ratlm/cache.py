"""Inference state: one named, preallocated state per layer, all with static shapes.

Every state holds its position twice. `seen` is a host int: the general path (any number of new tokens)
slices with it and room checks read it. `pos` is a [B] int64 tensor on the state's device, one entry per
sequence: the one-token decode kernels read it, so a single CUDA graph serves every step, and sequences may
stand at different positions (prompts of different lengths, each prefilled on its own). Both move together;
while rows differ, `seen` is the largest row position.

The second half plans memory: `plan_batch` sizes the largest batch whose caches and activations fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor


class CacheOverflowError(ValueError):
    """More tokens than the cache was allocated for."""


def _positions(seen: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), seen, dtype=torch.int64, device=like.device)


@dataclass
class RATState:
    keys: Tensor  # [B, H, C, d] summary key of every completed chunk, rotated by its chunk index
    values: Tensor  # [B, H, C, d] summary value of every completed chunk
    k_run: Tensor  # [B, H, d] fp32 running key state of the current chunk (before RoPE)
    v_run: Tensor  # [B, H, d] fp32 running value state of the current chunk
    seen: int = 0  # tokens consumed so far (host)
    pos: Tensor | None = None  # [B] int64 on the device: tokens consumed by each sequence
    rope: Tensor | None = None  # [C, d] fp32 cos | sin halves of each chunk index's rotation (shared)

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = _positions(self.seen, self.keys)


@dataclass
class KVState:
    keys: Tensor  # [B, H, N, d] keys after RoPE at their token position
    values: Tensor  # [B, H, N, d]
    seen: int = 0
    pos: Tensor | None = None  # [B] int64 on the device
    rope: Tensor | None = None  # [N, d] fp32 cos | sin halves of each token position's rotation

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = _positions(self.seen, self.keys)


@dataclass
class WindowState:
    keys: Tensor  # [B, H, W+1, d] ring buffer: position p lives in slot p % (W+1)
    values: Tensor  # [B, H, W+1, d]
    seen: int = 0
    pos: Tensor | None = None  # [B] int64 on the device
    rope: Tensor | None = None  # [max_len, d] fp32: positions run past the ring's size

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = _positions(self.seen, self.keys)


@dataclass
class RNNState:
    state: Tensor  # [B, D] fp32 recurrent state
    seen: int = 0
    pos: Tensor | None = None  # [B] int64 on the device (unused by the RNN, kept for a uniform cache)

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = _positions(self.seen, self.state)


LayerState = RATState | KVState | WindowState | RNNState


def advance(state: LayerState, n: int = 1) -> None:
    """Move a state's position by n tokens: the device counter, and the host one unless inside a compiled
    step, whose caller (`ratlm.generation.DecodeStep`) keeps the host counters so that nothing compiled
    depends on them."""
    state.pos.add_(n)
    if not torch.compiler.is_compiling():
        state.seen += n


def move_to(state: LayerState, n: int) -> None:
    """Put every sequence of a state at position n: the host counter and the device one."""
    state.seen = n
    state.pos.fill_(n)


def clear(state: LayerState) -> None:
    """Forget every token of a state, keeping its buffers: position 0 and zeroed storage."""
    move_to(state, 0)
    for name in row_tensors(state):
        getattr(state, name).zero_()


_SHARED = ("seen", "pos", "rope")  # not per-sequence storage


def row_tensors(state: LayerState) -> list[str]:
    """Names of the state's per-sequence tensors (batch first): the storage that grows with the batch."""
    return [f.name for f in fields(state) if f.name not in _SHARED]


def state_nbytes(state: LayerState) -> int:
    """Bytes of per-sequence storage (tables shared by every row and the position counters excluded)."""
    return sum(getattr(state, name).nbytes for name in row_tensors(state))


def rope_table(n: int, dim: int, base: float, device) -> Tensor:
    """[n, dim] fp32: cos (first half) and sin (second half) of the rotation of positions 0..n-1.

    Exactly the values `rope_cos_sin` gives (its tables repeat each half twice), so the decode kernels,
    which gather one row by the position they read on the device, agree with the general path. Layers
    without RoPE get a table of 0 rows, so that every state field is a tensor.
    """
    from .ops.rope import rope_cos_sin  # the ops import this module

    cos, sin = rope_cos_sin(torch.arange(n, device=device), dim, base)
    return torch.cat([cos[:, : dim // 2], sin[:, : dim // 2]], dim=1).contiguous()


def shared_rope_table(tables: dict | None, n: int, dim: int, base: float, device) -> Tensor:
    """`rope_table`, built once per (n, dim, base, device) when several layers pass the same `tables` dict."""
    key = (n, dim, float(base), str(torch.device(device)))
    if tables is None:
        return rope_table(n, dim, base, device)
    if key not in tables:
        tables[key] = rope_table(n, dim, base, device)
    return tables[key]


@dataclass
class ModelCache:
    layers: list[LayerState]
    batch_size: int
    max_len: int
    ragged: bool = False  # sequences at different positions: only one-token steps may follow

    @property
    def seen(self) -> int:
        """Tokens consumed so far (the position of the next token; the largest one while ragged)."""
        return self.layers[0].seen if self.layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes of per-sequence storage for the whole batch (shared RoPE tables not included)."""
        return sum(state_nbytes(s) for s in self.layers)

    @property
    def table_nbytes(self) -> int:
        """Bytes of the RoPE tables, counted once however many layers share them."""
        tables = {id(s.rope): s.rope.nbytes for s in self.layers if getattr(s, "rope", None) is not None}
        return sum(tables.values())

    def reset(self) -> None:
        """Forget all tokens, keeping the buffers (no reallocation)."""
        for s in self.layers:
            clear(s)
        self.ragged = False

    def check_room(self, n_new: int) -> None:
        if self.seen + n_new > self.max_len:
            raise CacheOverflowError(
                f"the cache holds {self.max_len} tokens (max_len); {self.seen} are in it and {n_new} more "
                f"were given. Allocate a larger cache with model.new_cache(batch_size, max_len=...)"
            )

    def rows(self, start: int, stop: int) -> ModelCache:
        """Sequences start..stop-1 as a cache whose buffers are views into this one: filling it fills them.

        Used to prefill a large batch a few sequences at a time, or each prompt at its own length.
        """
        if self.ragged:
            raise ValueError("rows() of a cache whose sequences stand at different positions")
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop - 1} outside the batch of {self.batch_size}")
        views = []
        for s in self.layers:
            sliced = {name: getattr(s, name)[start:stop] for name in row_tensors(s)}
            views.append(replace(s, **sliced, pos=s.pos[start:stop]))
        return ModelCache(layers=views, batch_size=stop - start, max_len=self.max_len)

    def set_positions(self, positions: Sequence[int]) -> None:
        """Declare where each sequence stands after its rows were filled separately (see `rows`)."""
        if len(positions) != self.batch_size or min(positions) < 0 or max(positions) > self.max_len:
            raise ValueError(f"need {self.batch_size} positions in 0..{self.max_len}, got {list(positions)}")
        device_positions = torch.tensor(list(positions), dtype=torch.int64)
        for s in self.layers:
            s.pos.copy_(device_positions)
            s.seen = max(positions)
        self.ragged = len(set(positions)) > 1


def cache_bytes_per_sequence(model, max_len: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of inference state one sequence of up to max_len tokens takes: new_cache's storage per row."""
    return model.new_cache(1, max_len, device="meta", dtype=dtype).nbytes


def _in_proj_width(config) -> int:
    D = config.d_model
    return 3 * D + (2 * config.n_groups * config.head_dim if "rat" in config.pattern else 0)


def decode_bytes_per_sequence(config, dtype: torch.dtype) -> int:
    """Activation bytes of one sequence in a decode step, logits and sampling included, with 25% to spare.

    Counts every intermediate of the widest layer as alive at once (a CUDA graph's pool keeps a step's
    intermediates); sampling's fp32 logits, softmax and top-p sort dominate.
    """
    e, D, F, V = dtype.itemsize, config.d_model, config.d_ffn, config.vocab_size
    layer = D * (4 * e + 8) + _in_proj_width(config) * e + 2 * F * e
    sampling = V * (e + 32)
    return int(1.25 * (layer + sampling))


def prefill_bytes_per_token(config, dtype: torch.dtype, prompt_len: int) -> int:
    """Activation bytes per prompt token of a prefill forward (the peak layer), with 25% to spare.

    Generous where the fast kernels are not in use: RAT's vectorised scan keeps about eight fp32 copies of
    its [2D] states and the masked chunk attention a few [H, C] score rows per token; sliding-window
    attention with an explicit mask may fall back to scores [H, T] per token.
    """
    e, D, F, H = dtype.itemsize, config.d_model, config.d_ffn, config.n_heads
    layer = D * (2 * e + 12) + _in_proj_width(config) * e + 2 * F * e
    mixers = set(config.pattern)
    extra = 0
    if "rat" in mixers:
        chunks = prompt_len // config.chunk_size + 1
        extra = max(extra, 2 * D * 4 * 8 + 4 * D * e + D * (e + 16) + 4 * 4 * H * chunks)
    if "rnn" in mixers:
        extra = max(extra, D * 4 * 8)
    if "attn" in mixers:
        extra = max(extra, D * (3 * e + 24))
    if "swa" in mixers:
        extra = max(extra, D * (3 * e + 24) + 3 * 4 * H * prompt_len)
    return int(1.25 * (layer + extra))


def free_bytes(device) -> int:
    """Memory new tensors can take now: the device's free memory plus what torch's allocator holds unused."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryPlan:
    batch_size: int  # the largest batch that fits (0: not even one sequence)
    max_len: int  # tokens per sequence the cache holds
    prefill_rows: int  # sequences per prefill forward
    cache_bytes_per_sequence: int
    decode_bytes_per_sequence: int  # activations of one decode step
    prefill_bytes: int  # activations of one prefill forward of prefill_rows sequences
    table_bytes: int  # RoPE tables, shared by all sequences
    free_bytes: int  # what the plan had to share out
    reserve_bytes: int  # kept back: CUDA context, library workspaces, fragmentation

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        gib = 2**30
        return (
            f"largest batch {self.batch_size} at {self.max_len} tokens: cache "
            f"{self.cache_bytes_per_sequence / 2**20:.1f} MiB + decode step "
            f"{self.decode_bytes_per_sequence / 2**20:.2f} MiB per sequence; prefill {self.prefill_rows} "
            f"sequences per forward ({self.prefill_bytes / gib:.1f} GiB); of {self.free_bytes / gib:.1f} GiB "
            f"free, {self.reserve_bytes / gib:.1f} GiB kept back"
        )


def plan_batch(
    model,
    max_len: int,
    prompt_len: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    free: int | None = None,
    prefill_tokens: int = 32768,
    reserve: int | None = None,
) -> MemoryPlan:
    """The largest batch whose caches, decode step and prefill fit in memory, computed rather than searched.

    model: the LanguageModel, already on its device (it may be on the meta device when `free` is given,
    e.g. to plan for a card from a preset). max_len: tokens per sequence; prompt_len: the prompt length that
    sizes the prefill (default max_len), which goes prefill_tokens tokens per forward. free: bytes available
    besides the weights (default: free memory of the model's device now). reserve: bytes kept back
    (default 1 GiB + 3% of free). Prefill activations take at most 5% of free (fewer rows per forward).
    """
    config = model.config
    param = model.embed.weight
    dtype = param.dtype if dtype is None else dtype
    prompt_len = max_len if prompt_len is None else prompt_len
    free = free_bytes(param.device) if free is None else free
    reserve = 2**30 + int(0.03 * free) if reserve is None else reserve
    meta_cache = model.new_cache(1, max_len, device="meta", dtype=dtype)
    per_cache = meta_cache.nbytes
    per_decode = decode_bytes_per_sequence(config, dtype)
    per_token = prefill_bytes_per_token(config, dtype, prompt_len)
    # prefill_tokens per forward, but never more than 5% of the memory in prefill activations
    rows = max(1, min(prefill_tokens // max(prompt_len, 1), int(0.05 * free) // (prompt_len * per_token)))
    prefill = rows * prompt_len * per_token
    room = free - reserve - prefill - meta_cache.table_nbytes
    batch = max(0, room // (per_cache + per_decode))
    return MemoryPlan(
        batch_size=batch,
        max_len=max_len,
        prefill_rows=max(1, min(rows, batch)),
        cache_bytes_per_sequence=per_cache,
        decode_bytes_per_sequence=per_decode,
        prefill_bytes=prefill,
        table_bytes=meta_cache.table_nbytes,
        free_bytes=free,
        reserve_bytes=reserve,
    )
