"""Training FLOPs per token (for MFU), memory readings and the run log (JSONL, optional TensorBoard).

FLOPs per token of one training step (forward + backward = 3 x forward):

    6 * N_matmul  +  sum over layers of 12 * D * K_mean

N_matmul counts every weight that takes part in a matrix product: all Linear layers plus the tied
embedding once, as the output head (the lookup itself is free); norm weights and gate biases are left
out. That is 6 * N_non-embedding + 6 * V * D. K_mean is the mean number of keys a query attends to,
each costing 2 * D FLOPs for q.k and 2 * D for p.v in the forward:
    attention             (T + 1) / 2                   (causal; half of PaLM's 12 * D * T convention)
    sliding window W      mean over t of min(t + 1, W + 1)
    RAT, chunk L          mean over t of (t // L + 1)   (earlier chunks' summaries + the running state)
    RNN                   0
Elementwise work (the scans, gates, norms, softmax) is not counted. MFU = FLOPs per token x tokens/s
/ (peak FLOP/s x GPUs); the default peak is 989 TFLOP/s, dense bf16 of an H100/H200.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ModelConfig

H100_BF16_TFLOPS = 989.0


def mean_keys(mixer: str, cfg: ModelConfig, seq_len: int) -> float:
    t = np.arange(seq_len, dtype=np.float64)
    if mixer == "attn":
        return (seq_len + 1) / 2
    if mixer == "swa":
        return float(np.minimum(t + 1, cfg.window + 1).mean())
    if mixer == "rat":
        return float((t // cfg.chunk_size + 1).mean())
    return 0.0


def matmul_params(model: nn.Module) -> int:
    """Weights of every Linear layer plus the tied embedding, counted once as the output head."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear + model.embed.weight.numel()


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of an (unsharded) LanguageModel; see the module doc."""
    cfg: ModelConfig = model.config
    attention = sum(12 * cfg.d_model * mean_keys(m, cfg, seq_len) for m in cfg.pattern)
    return 6 * matmul_params(model) + attention


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the previous call, or on CPU the process's peak RSS so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class RunLog:
    """One JSON object per step in RUN/train_log.jsonl; on resume, records after the resumed step are dropped
    (they belong to the interrupted attempt)."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard: bool = False, enabled: bool = True):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        kept = []
        if resume_step and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 (kept open for the run; closed in close())
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from e
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
