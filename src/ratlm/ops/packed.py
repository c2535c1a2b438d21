"""A fused projection's output split into its pieces without a concatenation in the backward.

`u.split(sizes, -1)` backpropagates by concatenating the pieces' gradients into a new tensor: at 262,144
tokens and RAT's 6,656 projected channels that is 7 GB of traffic per layer. `split_packed` has the same
forward, and when the pieces' gradients already are slices of one buffer laid out like u (a kernel that
wrote them so, see `packed_layout`), its backward returns that buffer as u's gradient, with no copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import fast_path_wanted


def packed_layout(*pieces: Tensor) -> tuple | None:
    """(shape, stride, dtype, [(shape, stride, offset)] per piece) when the pieces are last-dimension slices
    of one contiguous tensor u (each `u[..., a:b]`, possibly viewed with its last dimension split) that
    together cover all of u; offsets count from u's first element. None otherwise. A gradient written into
    views laid out like this is u's gradient."""
    base = pieces[0]._base
    if (
        base is None
        or not base.is_contiguous()
        or any(t._base is not base or t.dtype != base.dtype for t in pieces)
    ):
        return None
    lead, width = base.dim() - 1, base.shape[-1]
    spans, views = [], []
    for t in pieces:
        trailing = t.shape[lead:]
        n = trailing.numel()
        compact = tuple(trailing[i + 1 :].numel() for i in range(len(trailing)))  # row-major strides
        offset = t.storage_offset() - base.storage_offset()
        if t.shape[:lead] != base.shape[:lead] or not _same_strides(
            t.shape, t.stride(), base.stride()[:lead] + compact
        ):
            return None
        if not 0 <= offset <= width - n:
            return None
        spans.append((offset, offset + n))
        views.append((tuple(t.shape), t.stride(), offset))
    spans.sort()
    if (
        spans[0][0] != 0
        or spans[-1][1] != width
        or any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False))
    ):
        return None
    return tuple(base.shape), base.stride(), base.dtype, views


def packed_views(layout: tuple, device) -> list[Tensor]:
    """The pieces' views of a new tensor with `packed_layout`'s layout (to write gradients into)."""
    shape, stride, dtype, views = layout
    full = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return [full.as_strided(s, st, full.storage_offset() + off) for s, st, off in views]


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, sizes: list[int]):
        ctx.shape, ctx.stride, ctx.sizes = tuple(u.shape), u.stride(), list(sizes)
        return tuple(u.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        packed = _as_one(grads, ctx.shape, ctx.stride, ctx.sizes)
        if packed is not None:
            return packed, None
        ref = next(g for g in grads if g is not None)
        parts = [
            g if g is not None else ref.new_zeros(*ctx.shape[:-1], n)
            for g, n in zip(grads, ctx.sizes, strict=True)
        ]
        return torch.cat(parts, dim=-1), None


def _as_one(grads, shape, stride, sizes) -> Tensor | None:
    """The tensor of u's shape and strides whose last-dimension slices the grads are, if they are."""
    if any(g is None for g in grads) or len({(g.device, g.dtype) for g in grads}) != 1:
        return None
    storage = grads[0].untyped_storage().data_ptr()
    start = grads[0].storage_offset()
    column = 0
    for g, n in zip(grads, sizes, strict=True):
        if (
            g.untyped_storage().data_ptr() != storage
            or tuple(g.shape) != (*shape[:-1], n)
            or not _same_strides(g.shape, g.stride(), stride)
        ):
            return None
        if g.storage_offset() != start + column:
            return None
        column += n
    # the grads cover u's columns one after the other, so the whole's elements are exactly theirs
    return grads[0].as_strided(shape, stride, start)


def _same_strides(shape, a, b) -> bool:
    """Equal strides along every dimension longer than 1 (a dimension of size 1 may have any stride)."""
    return len(a) == len(b) and all(n == 1 or x == y for n, x, y in zip(shape, a, b, strict=False))


def split_packed(u: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    """`u.split(sizes, dim=-1)` whose backward skips the concatenation when it can (see the module): in
    eager autograd on the GPU path; elsewhere (no kernel writes packed gradients there) torch's split."""
    if torch.compiler.is_compiling() or not (
        torch.is_grad_enabled() and u.requires_grad and fast_path_wanted(u)
    ):
        return tuple(u.split(sizes, dim=-1))
    return _Split.apply(u, sizes)
