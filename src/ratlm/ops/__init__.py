"""Ops: each has a plain PyTorch reference (`*_naive`) with the same signature as its fast version."""

from .attention import attention, attention_naive
from .rat import chunk_attention, chunk_attention_naive, rat_mix, rat_mix_cached, rat_mix_naive
from .rope import apply_rope, rope_cos_sin
from .scan import gated_scan, gated_scan_naive

__all__ = [
    "apply_rope",
    "attention",
    "attention_naive",
    "chunk_attention",
    "chunk_attention_naive",
    "gated_scan",
    "gated_scan_naive",
    "rat_mix",
    "rat_mix_cached",
    "rat_mix_naive",
    "rope_cos_sin",
]
