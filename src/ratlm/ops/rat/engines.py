"""Attention over chunk summaries with "chunks as heads", so existing attention kernels do the work.

Queries of chunk c see the summaries of chunks 0..c-1. Put the L queries of a chunk side by side as L query
heads sharing their head's summary keys (grouped-query attention, query head h*L + l uses key head h) and
shift them by one chunk: query row c' holds chunk c'+1. Then ordinary causal attention over C-1 rows is
exactly "chunk c sees summaries < c":

    queries [B, H*L, C-1, d] (a view of a [B, C, H, L, d] buffer), keys and values [B, H, C-1, d].

An engine returns the output and the log-sum-exp of every query row, and has a backward that takes the
output and log-sum-exp as given (so they may be replaced by the ones merged with the token's own state).
`lse` comes back as a [B, H*L, C-1] view of the engine's own buffer, with `unit` such that
natural-log lse = raw * unit; the merge writes the merged statistic back into that buffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backend import log


class TorchHeadsEngine:
    """Plain PyTorch engine (fp32 math), the reference for the kernels' plumbing; fine at small sizes."""

    name = "torch"
    unit = 1.0

    def _scores(self, q: Tensor, k: Tensor, scale: float) -> Tensor:
        group = q.shape[1] // k.shape[1]
        kx = k.float().repeat_interleave(group, dim=1)
        s = (q.float() @ kx.transpose(-1, -2)) * scale  # [B, Hq, S, S]
        S = q.shape[2]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        return s.masked_fill(~causal, float("-inf"))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float):
        group = q.shape[1] // k.shape[1]
        with torch.autocast(q.device.type, enabled=False):  # fp32 math whatever the caller's autocast
            s = self._scores(q, k, scale)
            lse = torch.logsumexp(s, dim=-1)
            o = torch.exp(s - lse[..., None]) @ v.float().repeat_interleave(group, dim=1)
        return o.to(q.dtype), lse, None

    def backward(
        self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, state, scale: float
    ):
        B, H, S, d = k.shape
        group = q.shape[1] // H
        with torch.autocast(q.device.type, enabled=False):
            p = torch.exp(self._scores(q, k, scale) - lse[..., None])  # [B, Hq, S, S]
            dof = do.float()
            dv = (p.transpose(-1, -2) @ dof).view(B, H, group, S, d).sum(2)
            dp = dof @ v.float().repeat_interleave(group, dim=1).transpose(-1, -2)
            ds = p * (dp - (dof * o.float()).sum(-1, keepdim=True))
            dq = scale * ds @ k.float().repeat_interleave(group, dim=1)
            dk = (scale * ds.transpose(-1, -2) @ q.float()).view(B, H, group, S, d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CudnnHeadsEngine:
    """cuDNN's fused attention through torch's private ops (the kernels behind SDPA's cuDNN backend).

    Its log-sum-exp format (shape, log base) is not a documented contract, so `probe` checks it, and the
    backward with a given output and log-sum-exp, against PyTorch on a tiny problem of the same head
    structure before first use; if native grouped-query attention is refused, keys and values are
    expanded to every query head instead.
    """

    name = "cudnn"

    def __init__(self, unit: float, expand: bool):
        self.unit, self.expand = unit, expand

    def _kv(self, k: Tensor, group: int) -> Tensor:
        return k.repeat_interleave(group, dim=1) if self.expand else k

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float):
        group = q.shape[1] // k.shape[1]
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, self._kv(k, group), self._kv(v, group), None, True, 0.0, True, False, scale=scale
        )
        o, lse_raw = out[0], out[1]
        lse = lse_raw.squeeze(-1) if lse_raw.dim() == 4 else lse_raw
        return o, lse, (lse_raw, *out[2:8])

    def backward(
        self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, state, scale: float
    ):
        B, H, S, d = k.shape
        group = q.shape[1] // H
        lse_raw, cum_q, cum_k, max_q, max_k, seed, offset = state
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, self._kv(k, group), self._kv(v, group), o, lse_raw, seed, offset, None,
            cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale,
        )  # fmt: skip
        if self.expand:
            dk = dk.view(B, H, group, S, d).sum(2)
            dv = dv.view(B, H, group, S, d).sum(2)
        return dq, dk, dv


_PROBED: dict[tuple, CudnnHeadsEngine | None] = {}


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _try_engine(engine: CudnnHeadsEngine, q, k, v, do, scale) -> str | None:
    """None when the engine matches the PyTorch engine on these inputs, else what differs."""
    ref = TorchHeadsEngine()
    o_ref, lse_ref, _ = ref.forward(q, k, v, scale)
    o, lse, state = engine.forward(q, k, v, scale)
    if tuple(lse.shape) != tuple(lse_ref.shape):
        return f"log-sum-exp shape {tuple(lse.shape)}"
    if _rel_err(lse.float() * engine.unit, lse_ref) > 1e-2 or _rel_err(o, o_ref) > 3e-2:
        return "forward output or log-sum-exp differ"
    grads_ref = ref.backward(do, q, k, v, o, lse.float() * engine.unit, None, scale)
    grads = engine.backward(do, q, k, v, o, lse, state, scale)
    errs = [_rel_err(a, b) for a, b in zip(grads, grads_ref, strict=True)]
    if max(errs) > 3e-2:
        return f"backward differs (relative errors {errs})"
    return None


def cudnn_engine(dtype: torch.dtype, d: int, H: int, L: int, device, make=CudnnHeadsEngine):
    """The cuDNN engine for this head structure, checked once per process; None when it cannot run.

    `make(unit, expand)` builds a candidate (tests pass a stand-in with cuDNN's output format)."""
    key = (str(device), dtype, d, H, L, make)
    if key in _PROBED:
        return _PROBED[key]
    engine = None
    if dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(1234)
        S = 9

        def rnd(*shape):
            return torch.randn(*shape, device=device, generator=gen).to(dtype)

        # the layouts of the real call: views of [B, C, H, L, d] and [B, C, H, d] buffers (see fused.py)
        q, do = (rnd(1, S + 1, H * L, d)[:, 1:].transpose(1, 2) for _ in range(2))
        k, v = (rnd(1, S + 1, H, d)[:, :S].transpose(1, 2) for _ in range(2))
        scale = d**-0.5
        for expand in (False, True):
            for unit in (1.0, math.log(2.0)):
                candidate = make(unit, expand)
                try:
                    problem = _try_engine(candidate, q, k, v, do, scale)
                except RuntimeError as e:  # cuDNN refusing the shape, or a missing op
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if problem is None:
                    engine = candidate
                    break
                log.debug("cuDNN chunk attention (expand=%s, unit=%s): %s", expand, unit, problem)
            if engine is not None:
                break
    _PROBED[key] = engine
    log.debug("cuDNN chunk attention for %s: %s", key, "unavailable" if engine is None else vars(engine))
    return engine
