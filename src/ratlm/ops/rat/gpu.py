"""RAT's core on the GPU: input checks, the choice of attention engine, and the public entry point.

Engines for the attention over chunk summaries (all share the Triton scan kernels):
- "cudnn": chunks as heads through cuDNN's fused attention, merged with the own state by log-sum-exp;
  fp16/bf16, head width <= 128, checked against PyTorch on a tiny problem before first use.
- "triton": the fused flash-style Triton kernel whose online softmax starts from the own state.
- "flex": FlexAttention over [summaries ; own states] with a cached block mask (compiled on CUDA).
- "torch": chunks as heads with a PyTorch engine: the kernels' plumbing at small sizes, and a reference.
"auto" takes the first of cudnn, triton, flex that supports the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..backend import fallback, get_backend

ENGINES = ("auto", "cudnn", "triton", "flex", "torch")
MAX_CHUNK = 128
last_engine: str | None = None  # the engine of the latest call, for benchmarks and debugging
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk_size: int,
    gate_bias: Tensor | None = None, out_gate: Tensor | None = None,
) -> str | None:  # fmt: skip
    """Why the GPU path cannot take these inputs (None when it can); shapes are checked by the caller."""
    d = v.shape[3]
    gates = [t for t in (gate_bias, out_gate) if t is not None]
    if not (q.dtype == k.dtype == v.dtype and v.dtype in _FLOATS and g.dtype in _FLOATS):
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}, g {g.dtype}"
    if any(t.dtype not in _FLOATS for t in gates):
        return f"gate dtypes {[t.dtype for t in gates]}"
    if d < 8 or d > 256 or d & (d - 1):
        return f"head width {d} (a power of two from 8 to 256 is needed)"
    if chunk_size > MAX_CHUNK:
        return f"chunk size {chunk_size} > {MAX_CHUNK}"
    if v.shape[1] == 0:
        return "empty sequence"
    if len({t.device for t in (q, k, v, g, *gates)}) > 1:
        return "inputs on different devices"
    return None


def _engine_for(name: str, v: Tensor, chunk_size: int):
    """(kind, engine object) for an engine name, or None when it cannot take these inputs."""
    B, T, H, d = v.shape
    if name == "cudnn":
        if not v.is_cuda or v.dtype == torch.float32 or d > 128:
            return None
        from .engines import cudnn_engine

        engine = cudnn_engine(v.dtype, d, H, chunk_size, v.device)
        return None if engine is None else ("heads", engine)
    if name == "torch":
        from .engines import TorchHeadsEngine

        return "heads", TorchHeadsEngine()
    if name == "triton":
        from .flash import flash_supported

        return ("flash", None) if flash_supported(v) else None
    if name == "flex":
        return "flex", None
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")


def rat_mix_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    chunk_size: int,
    position: str = "rope",
    rope_base: float = 10000.0,
    scale: float | None = None,
    *,
    gate_bias: Tensor | None = None,
    out_gate: Tensor | None = None,
    engine: str = "auto",
    summaries: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """`ratlm.ops.rat_mix` with the Triton scan kernels and the given attention engine (see ENGINES).

    Same contract as `rat_mix` (q, k [B, T, G, d]; v, g [B, T, H, d]; returns [B, T, H, d] in v's dtype,
    possibly a non-contiguous view). The scan kernels apply gate_bias's sigmoid themselves; the
    chunks-as-heads engines ("cudnn", "torch") apply out_gate in their merge kernel, the others after it.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (engines "torch" and "triton"; "flex" forward only).
    Raises ValueError for inputs or engines that cannot run.

    summaries(vsum, ksum), for a cached prefill, is called once, by the engine that succeeds, with the chunk
    summaries as `rat_mix_chunk_heads` hands them over: from the chunks-as-heads engines' own scan, from a
    second scan for the others.
    """
    from ..scan.kernel import unit_last_stride
    from . import rat_mix_check
    from .gates import output_gate

    rat_mix_check(q, k, v, g, chunk_size, position, gate_bias, out_gate)
    reason = unsupported_reason(q, k, v, g, chunk_size, gate_bias, out_gate)
    if reason is not None:
        raise ValueError(f"rat_mix_triton: {reason}")
    # the kernels take any strides but a unit one along the head vector (views of a projection have it)
    q, k, v, g = (unit_last_stride(t) for t in (q, k, v, g))
    z = None if out_gate is None else unit_last_stride(out_gate)
    bias = None if gate_bias is None else gate_bias.reshape(-1).contiguous()
    d = v.shape[3]
    scale = d**-0.5 if scale is None else scale
    global last_engine
    rope = position == "rope"
    names = ("cudnn", "triton", "flex") if engine == "auto" else (engine,)
    for name in names:
        chosen = _engine_for(name, v, chunk_size)
        if chosen is None:
            fallback(f"rat_mix engine {name}", "cannot take these inputs")
            continue
        kind, obj = chosen
        if kind == "flex":
            from .flex import rat_mix_flex

            y = output_gate(rat_mix_flex(q, k, v, g, chunk_size, rope, rope_base, scale, bias), z)
        elif kind == "flash":
            from .flash import rat_mix_flash

            y = output_gate(rat_mix_flash(q, k, v, g, chunk_size, rope, rope_base, scale, bias), z)
        else:
            from .fused import rat_mix_chunk_heads

            try:
                args = (chunk_size, rope, rope_base, scale, obj, bias, z, summaries)
                y = rat_mix_chunk_heads(q, k, v, g, *args)
            except RuntimeError as e:  # e.g. cuDNN finding no plan for a size its probe did not cover
                if engine != "auto":
                    raise
                fallback(f"rat_mix engine {name}", f"{type(e).__name__}: {e}")
                continue
        if summaries is not None and kind != "heads":  # these engines' kernels keep theirs to themselves
            from .fused import scan_summaries

            summaries(*scan_summaries(k, v, g, chunk_size, rope, rope_base, bias))
        last_engine = name
        return y
    raise ValueError(f"rat_mix_triton: engine {engine!r} cannot run on these inputs")


# a model under torch.compile runs this eagerly: kernel choice, probes and caches are host logic
@torch.compiler.disable
def rat_mix_gpu_or_none(
    q, k, v, g, chunk_size, position, rope_base, scale, *, gate_bias=None, out_gate=None, summaries=None
) -> Tensor | None:  # fmt: skip
    """The GPU path when the backend and the inputs allow it, else None (the reason is logged);
    `summaries` as for `rat_mix_triton`."""
    reason = unsupported_reason(q, k, v, g, chunk_size, gate_bias, out_gate)
    if reason is not None:
        fallback("rat_mix", reason, costly=v.shape[1] > 0, stacklevel=5)  # past torch.compiler.disable
        return None
    backend = get_backend()
    gates = dict(gate_bias=gate_bias, out_gate=out_gate, summaries=summaries)
    for engine in dict.fromkeys((backend if backend in ENGINES else "auto", "auto")):
        try:
            return rat_mix_triton(q, k, v, g, chunk_size, position, rope_base, scale, **gates, engine=engine)
        except ValueError as e:
            fallback("rat_mix", str(e), costly=engine == "auto")
    return None
