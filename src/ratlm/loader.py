"""Training windows from a token stream: deterministic in (seed, position), resumable from a few integers.

The stream (memory-mapped shards, or an in-memory array such as the embedded corpus) is cut into
windows of seq_len + 1 tokens starting at multiples of seq_len, so neighbours share one token and every
token is a target once per epoch. The loader hands out "sample positions" 0, 1, 2, ...; position p is
window perm_e(p mod n) of epoch e = p // n, where perm_e is a keyed pseudo-random permutation (a Feistel
network: O(1) memory, no shuffled index array even for billions of windows) or the identity when not
shuffling. A global batch takes the next G positions; rank r of W takes the r-th slice of G/W, cut
into micro-batches. So the data of a step depends only on (seed, positions consumed, rank), the same
global batch gives the same samples whatever the number of ranks, and resuming needs only `consumed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .shards import DataError, load_manifest, shard_paths

IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1


class TokenSource:
    """One flat token stream made of consecutive parts (shards); documents end with `eos_id`."""

    def __init__(self, parts: Sequence[np.ndarray], eos_id: int | None, vocab_size: int | None, name: str):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.eos_id, self.vocab_size, self.name = eos_id, vocab_size, name
        if len(self) == 0:
            raise DataError(f"{name} holds no tokens")

    @classmethod
    def from_array(
        cls, tokens: np.ndarray, eos_id: int | None, vocab_size: int | None = None, name: str = "token array"
    ) -> TokenSource:
        return cls([np.asarray(tokens)], eos_id, vocab_size, name)

    @classmethod
    def from_directory(cls, directory: str | Path) -> TokenSource:
        """Memory-map the shards of a `ratlm tokenize` folder (sizes are checked, contents are not)."""
        manifest = load_manifest(directory)
        parts = [
            np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(n,))
            for path, n in shard_paths(directory, manifest)
        ]
        return cls(parts, manifest["eos_id"], manifest["vocab_size"], str(directory))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, across part boundaries."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, pos = [], start
        for i in range(first, len(self.parts)):
            if pos >= stop:
                break
            lo = pos - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            pieces.append(self.parts[i][lo:hi])
            pos += hi - lo
        return np.concatenate(pieces).astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-spread hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A pseudo-random permutation of range(n) keyed by `key`, applied to `index` (values < n).

    A 4-round Feistel network over the smallest even number of bits covering n is a bijection on
    [0, 2^bits); re-applying it to values >= n ("cycle walking") keeps it a bijection on [0, n).
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [int(_mix(np.array([(key * 4 + r) & _MASK64], dtype=np.uint64))[0]) for r in range(4)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ np.uint64(k)) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(np.asarray(index, dtype=np.uint64))
    while (outside := out >= n).any():
        out[outside] = feistel(out[outside])
    return out.astype(np.int64)


class WindowLoader:
    """Hands out windows of seq_len + 1 tokens by sample position; `consumed` is the resume point."""

    def __init__(self, source: TokenSource, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.source, self.seq_len, self.seed, self.shuffle = source, seq_len, seed, shuffle
        self.n_windows = (len(source) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"seq_len {seq_len} is longer than the data: {source.name} has {len(source)} tokens, "
                f"a window needs {seq_len + 1}"
            )
        self.consumed = 0

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window index of sample positions start .. start + count - 1."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epoch, index = pos // self.n_windows, pos % self.n_windows
        if not self.shuffle:
            return index
        out = np.empty_like(index)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(index[sel], self.n_windows, (self.seed << 20) + int(e))
        return out

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), seq_len + 1] int64 tokens."""
        T = self.seq_len
        return np.stack([self.source.read(int(i) * T, int(i) * T + T + 1) for i in ids])

    def next_step(
        self, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1
    ) -> list[np.ndarray]:
        """This rank's micro-batches (window arrays) of the next global batch; advances `consumed`."""
        per_rank = global_batch // world
        if per_rank * world != global_batch or per_rank % micro_batch:
            raise ValueError(
                f"global batch {global_batch} does not split into {world} ranks x micro-batches "
                f"of {micro_batch}"
            )
        ids = self.window_ids(self.consumed + rank * per_rank, per_rank)
        self.consumed += global_batch
        return [self.windows(ids[i : i + micro_batch]) for i in range(0, per_rank, micro_batch)]

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_windows", "shuffle"):
            if state[key] != mine[key]:
                raise DataError(
                    f"the checkpoint's data position does not fit this data: {key} was {state[key]}, "
                    f"is {mine[key]} "
                    "(resume with the same data, --seq-len and --seed)"
                )
        self.consumed = int(state["consumed"])


def to_batch(
    windows: np.ndarray, eos_id: int | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, seq_len]; a target right after an EOS (a document's first token) is ignored."""
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(windows[:, 1:].copy())
    if eos_id is not None:
        y[x == eos_id] = IGNORE_INDEX
    if torch.device(device).type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
