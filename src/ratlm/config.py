"""Model configuration: one validated dataclass and a dict of named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

MIXERS = ("rat", "attn", "swa", "rnn")
"""Token mixers: RAT, causal attention, sliding-window attention, gated RNN (SPEC §1-2)."""

POSITIONS = ("rope", "nope")


class ConfigError(ValueError):
    """A configuration value is outside its allowed range."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # rows of the (tied) embedding matrix
    d_model: int = 2048  # residual width D
    n_layers: int = 24  # number of (mixer, FFN) blocks
    n_heads: int = 16  # heads H; head width d = D / H
    layers: str = "rat"  # mixer pattern, comma separated, cycled over the layers: "rat", "rat,swa", ...
    chunk_size: int = 16  # RAT chunk length L (L=1 is attention, L>=T an RNN)
    n_groups: int = 2  # RAT query/key groups G (must divide H); head j uses group j mod G
    window: int = 1024  # sliding-window attention: query t sees keys t-W..t (W+1 keys)
    d_ffn: int = 8192  # FFN hidden width
    position: str = "rope"  # "rope" (RAT: chunk index, attention: token index) or "nope"
    rope_base: float = 10000.0
    context: int = 4096  # training context; also sets the RNN gate-bias init log U(1, context-1)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    rat_l1_gate_bias: float = -4.0  # gate-bias init when L=1 (the paper's log U(1, L-1) is empty there)
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. where a conversion came from)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ffn", "context"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 and self.position == "rope":
            raise ConfigError(f"head width d_model/n_heads = {self.head_dim} must be even for RoPE")
        pattern = self.pattern
        bad = [m for m in pattern if m not in MIXERS]
        if bad:
            raise ConfigError(f"layers: unknown mixer {bad[0]!r}; allowed: {', '.join(MIXERS)}")
        if "rat" in pattern:
            if not _is_int(self.chunk_size) or self.chunk_size < 1:
                raise ConfigError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
            if not _is_int(self.n_groups) or self.n_groups < 1 or self.n_heads % self.n_groups:
                raise ConfigError(
                    f"n_groups ({self.n_groups}) must be a positive divisor of n_heads ({self.n_heads})"
                )
        if "swa" in pattern and (not _is_int(self.window) or self.window < 0):
            raise ConfigError(f"window must be an integer >= 0, got {self.window!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_base <= 1:
            raise ConfigError("norm_eps and init_std must be > 0 and rope_base > 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pattern(self) -> list[str]:
        """The mixer name of every layer."""
        names = [s.strip() for s in self.layers.split(",") if s.strip()]
        if not names:
            raise ConfigError("layers must name at least one mixer")
        return [names[i % len(names)] for i in range(self.n_layers)]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "ratlm", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        data.pop("model_type", None)
        return cls.from_dict(data)


_PAPER = dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_groups=2, d_ffn=8192, context=4096)
_SMALL = dict(vocab_size=257, d_model=256, n_layers=4, n_heads=4, n_groups=2, d_ffn=1024, context=256)

PRESETS: dict[str, dict] = {
    # the paper's five 1.3B models (Table 1 / Figure 4)
    "attn-1.3b": dict(_PAPER, layers="attn"),
    "rat-1.3b": dict(_PAPER, layers="rat", chunk_size=16),
    "rnn-1.3b": dict(_PAPER, layers="rnn"),
    "attn-swa-1.3b": dict(_PAPER, layers="attn,swa", window=1024),
    "rat-swa-1.3b": dict(_PAPER, layers="rat,swa", chunk_size=16, window=1024),
    # small byte-level models for CPU work (vocab 257 = 256 bytes + EOS)
    "rat-small": dict(_SMALL, layers="rat", chunk_size=16),
    "attn-small": dict(_SMALL, layers="attn"),
    "rnn-small": dict(_SMALL, layers="rnn"),
    "swa-small": dict(_SMALL, layers="swa", window=64),
    "rat-swa-small": dict(_SMALL, layers="rat,swa", chunk_size=16, window=64),
    "rat-tiny": dict(_SMALL, d_model=64, n_layers=2, n_heads=2, d_ffn=256, context=64, chunk_size=8),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
