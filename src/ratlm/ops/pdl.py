"""Programmatic dependent launch (PDL) for the small kernels of a decode step, on Hopper and later GPUs.

A decode step at batch 1 is a chain of short kernels (norm, products, the attention split, the step), and each
launch costs a microsecond or two of ramp before its programs run. A kernel launched with PDL may be scheduled
while the kernel before it is still running. Such a kernel calls `wait_for_previous` before it reads anything
the previous kernel writes, and before it writes anything the previous kernel may still read; past that point
it lets the next PDL kernel launch early. Before the wait it may only read what was complete before the
previous kernel started: weights, and the results of the kernels before it (which the previous kernel itself
waited for before letting this one launch).

Used when `wanted(tensor)`: a CUDA tensor on compute capability 9.0 or later, outside torch.compile, and not
switched off (RATLM_PDL=0 in the environment, or `set_enabled(False)`). Elsewhere `wait_for_previous(False)`
compiles to nothing and the launch options are empty, so the kernels also run under the interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_wait = gdc_launch_dependents = None

_enabled = os.environ.get("RATLM_PDL", "1").strip() not in ("0", "false", "no")


def set_enabled(on: bool) -> None:
    """Switch PDL on or off for the whole process (benchmarks compare the two)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@functools.cache
def _supported(device: torch.device) -> bool:
    if gdc_wait is None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def wanted(t: Tensor) -> bool:
    """Whether kernels working on `t` launch with PDL."""
    return _enabled and t.is_cuda and not torch.compiler.is_compiling() and _supported(t.device)


def launch_options(on: bool) -> dict:
    """Keyword arguments for a Triton launch: PDL when `on` (nothing otherwise, for the interpreter)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then let the next kernel
    launch. Nothing when PDL is false."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
