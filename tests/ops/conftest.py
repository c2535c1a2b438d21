"""Shared setup of the kernel tests.

Without CUDA the Triton kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated, i.e. when its module is first imported; the kernel modules are imported lazily (only
by GPU dispatch or by the *_triton tests), so setting it here, before any test module of this folder is
imported, also covers a whole-suite run in one process.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _scan_one_position_at_a_time(self, input):
    """Triton's interpreter scans element by element, one Python call of the combine function each; this
    does the same scan one position along the axis at a time, the combine function applied to whole
    slices (it is elementwise), so the kernels' tests run in seconds. Same order of operations."""
    data = [arg.handle.data for arg in input]
    outs = [np.empty_like(x) for x in data]
    acc = None
    for i in range(data[0].shape[self.axis]):
        cur = tuple(
            self.to_tensor(np.take(x, i, axis=self.axis), arg.dtype)
            for x, arg in zip(data, input, strict=True)
        )
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*acc, *cur)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for out, a in zip(outs, acc, strict=True):
            np.moveaxis(out, self.axis, 0)[i] = a.handle.data
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outs, input, strict=True)]


try:
    from triton.runtime import interpreter as _interpreter
except ImportError:
    _interpreter = None
if _interpreter is not None and hasattr(getattr(_interpreter, "ScanOps", None), "generic_scan"):
    _interpreter.ScanOps.generic_scan = _scan_one_position_at_a_time


class _NanTorch:
    """Stands in for `torch` inside a kernel module: `empty`, `empty_like` and `empty_strided` return
    NaN-filled floating-point tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _nan(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    def empty(self, *args, **kwargs):
        return self._nan(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._nan(torch.empty_like(*args, **kwargs))

    def empty_strided(self, *args, **kwargs):
        return self._nan(torch.empty_strided(*args, **kwargs))


@pytest.fixture
def poison(monkeypatch):
    """poison(module, ...): every buffer those modules allocate with torch.empty starts as NaN, so an
    element a kernel should write but does not (or reads before writing) shows up in the results."""

    def apply(*modules):
        for module in modules:
            monkeypatch.setattr(module, "torch", _NanTorch())

    return apply


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else the CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
