"""Programmatic dependent launch (PDL) for the small kernels of a decode step, on Hopper and later GPUs.

A decode step at batch 1 is a chain of short kernels (norm, products, the attention split, the step), and each
launch costs a microsecond or two of ramp before its programs run. A kernel launched with PDL may be scheduled
while the kernel just before it in the stream is still running. The rules every kernel here keeps:

- It calls `wait_for_previous` before it reads anything the previous kernel may write, and before it writes
  anything the previous kernel may read. The wait returns once the previous kernel has finished and its
  writes are visible.
- Right after its wait it lets the next PDL kernel launch, never before. So when a kernel starts, every
  kernel before the previous one has finished: a plain launch runs after its predecessor finished, and one of
  these kernels let it start only after its own wait.
- Before the wait it reads only what no kernel still running writes: a weight the caller declares ready (a
  module's parameter in the middle of a forward), or, in RAT's step after the split kernel, the input
  projection's output, which the split kernel waited for.

Used when `wanted(tensor)`: a CUDA tensor on compute capability 9.0 or later, outside torch.compile, and not
switched off (RATLM_PDL=0, off or false in the environment; `set_enabled(False)`; `enabled_as(False)` for a
block). Elsewhere `wait_for_previous(False)` compiles to nothing and the launch options are empty, so the
kernels also run under the interpreter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_wait = gdc_launch_dependents = None

_enabled = os.environ.get("RATLM_PDL", "1").strip().lower() not in ("0", "off", "false", "no")


def set_enabled(on: bool) -> None:
    """Switch PDL on or off for the whole process."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """The switch (PDL is used only where `active` too)."""
    return _enabled


@contextmanager
def enabled_as(on: bool) -> Iterator[None]:
    """The switch set to `on` inside a `with` block, restored to what it was after it."""
    previous = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(previous)


@functools.cache
def _supported(device: torch.device) -> bool:
    if gdc_wait is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def active(device: torch.device | str) -> bool:
    """Whether kernels on `device` launch with PDL (outside torch.compile): switched on, CUDA, sm90+."""
    device = torch.device(device)
    return _enabled and device.type == "cuda" and _supported(device)


def wanted(t: Tensor) -> bool:
    """Whether kernels working on `t` launch with PDL."""
    return active(t.device) and not torch.compiler.is_compiling()


def launch_options(on: bool) -> dict:
    """Keyword arguments for a Triton launch: PDL when `on` (nothing otherwise, for the interpreter)."""
    return {"launch_pdl": True} if on else {}


def kernel_options(t: Tensor) -> dict:
    """The PDL constexpr and the launch options of a kernel working on `t`: `kernel[grid](..., **these)`."""
    on = wanted(t)
    return {"PDL": on, **launch_options(on)}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then let the next kernel
    launch. Nothing when PDL is false."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
