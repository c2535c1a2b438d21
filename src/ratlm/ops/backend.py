"""Which implementation the ops use: the PyTorch reference path or the GPU kernels.

One process-wide setting, read from the environment variable RATLM_BACKEND at import time:

- "auto" (default): CUDA tensors take the fastest GPU path that supports them; everything else, and every
  combination a GPU path does not support, takes the PyTorch path (the reason is logged at DEBUG level on
  the "ratlm.ops" logger).
- "torch": every op takes its PyTorch path, on any device.
- "cudnn", "flex", "triton": like "auto", but RAT's attention over chunk summaries uses that candidate
  (cuDNN attention with chunks as heads, FlexAttention, or the fused Triton kernel); when it cannot run
  the call falls back as "auto" would. Meant for benchmarks and for debugging one candidate.

    >>> from ratlm.ops import backend
    >>> backend.set_backend("torch")
    >>> with backend.use_backend("flex"):
    ...     ...
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "cudnn", "flex", "triton")

log = logging.getLogger("ratlm.ops")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_backend = _check(os.environ.get("RATLM_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The current backend name."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for the whole process (one of BACKENDS)."""
    global _backend
    _backend = _check(name)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside a `with` block, restoring the previous one after it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this kind of device, or None when autocast is off there."""
    on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return torch.get_autocast_dtype(device_type) if on else None


def fast_path_wanted(*tensors: Tensor) -> bool:
    """True when the backend allows a GPU path and every tensor lives on a CUDA device."""
    return _backend != "torch" and all(t.is_cuda for t in tensors)


_warned: set[tuple[str, str]] = set()


def fallback(op: str, reason: str, costly: bool = False, stacklevel: int = 3) -> None:
    """Record why a call that could have used a GPU path takes the PyTorch path.

    Logged at DEBUG on the "ratlm.ops" logger. A `costly` fallback (one whose PyTorch path holds
    quadratic-size score tensors, such as RAT's masked attention or windowed attention through a dense
    mask) also warns, once per (op, reason) in a process: on long sequences it can be many times slower
    and run out of memory where the GPU path would not. `stacklevel` points the warning at the caller's
    caller (more where a decorator stands between).
    """
    log.debug("%s: PyTorch path (%s)", op, reason)
    if costly and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(
            f"{op} takes its PyTorch path on CUDA ({reason}): far slower, and its score tensors grow with "
            "the square of the sequence length. RATLM_BACKEND=torch silences this by choosing that path.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
