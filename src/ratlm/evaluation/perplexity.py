"""Token-level perplexity over windows of a token stream, optionally strided, with the loss per position.

Windows hold seq_len inputs and the seq_len targets one token further. Without a stride they do not
overlap. With stride S < seq_len they start S tokens apart, the first window scores all its targets
and every later one only its last S, so each token is scored once, with at least seq_len - S tokens
of context after the first window. Tokens after the last whole window are not scored. A target right
after an EOS is not scored (it starts a new document, SPEC §3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..loader import IGNORE_INDEX, to_batch
from ..model import LanguageModel
from .inputs import EvalDataError, TokenStream


@dataclass
class PerplexityResult:
    loss: float  # mean cross-entropy (nats) per scored token
    ppl: float  # exp(loss)
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int
    position_loss: list[float | None]  # mean loss at each window position; None where nothing was scored
    position_tokens: list[int]  # scored tokens at each window position

    def summary(self) -> dict:
        """Everything but the per-position lists."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("position_")}


@torch.no_grad()
def token_losses(model: LanguageModel, inputs: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Cross-entropy [B, T] in fp32 of targets [B, T] given inputs [B, T]; 0 where a target is -100.

    With `chunk`, the inputs go through the inference cache `chunk` tokens at a time, so at most
    [B, chunk, vocab] logits exist at once; the losses are those of the full forward.
    """
    B, T = inputs.shape
    if chunk is None or chunk >= T:
        return _cross_entropy(model(inputs), targets)
    cache = model.new_cache(B, T)
    pieces = [
        _cross_entropy(model(inputs[:, s : s + chunk], cache=cache), targets[:, s : s + chunk])
        for s in range(0, T, chunk)
    ]
    return torch.cat(pieces, dim=1)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(targets.shape)


def window_starts(n_tokens: int, seq_len: int, stride: int) -> range:
    """Start of every whole window (seq_len inputs plus one more target token)."""
    return range(0, n_tokens - seq_len, stride)


def evaluate_perplexity(
    model: LanguageModel,
    stream: TokenStream,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    chunk: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of the model on the stream's windows (see the module docstring)."""
    stride = seq_len if stride is None else stride
    if seq_len < 1 or batch_size < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1, batch_size >= 1 and 1 <= stride <= seq_len, got {stride=}")
    tokens, eos = stream.tokens, stream.eos_id
    starts = window_starts(len(tokens), seq_len, stride)
    if len(starts) == 0:
        raise EvalDataError(
            f"{stream.name} holds {len(tokens)} tokens; a window of seq_len {seq_len} needs {seq_len + 1}"
        )
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise EvalDataError(f"{stream.name} holds token ids outside the model's vocabulary [0, {vocab})")
    device = next(model.parameters()).device
    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.int64)
    batches = range(0, len(starts), batch_size)
    for i in tqdm(batches, desc=f"ppl @ {seq_len}", disable=not progress, dynamic_ncols=True):
        batch = starts[i : i + batch_size]
        x, y = to_batch(np.stack([tokens[s : s + seq_len + 1] for s in batch]).astype(np.int64), eos, "cpu")
        scored = y != IGNORE_INDEX
        # Later windows only score their last `stride` targets: the earlier ones were scored before.
        scored[torch.tensor(list(batch)) > 0, : seq_len - stride] = False
        y[~scored] = IGNORE_INDEX
        losses = token_losses(model, x.to(device), y.to(device), chunk).cpu()
        loss_sum += losses.double().sum(0)
        counts += scored.sum(0)
    total = int(counts.sum())
    if total == 0:
        raise EvalDataError(f"{stream.name}: every target follows an EOS, nothing to score")
    loss = float(loss_sum.sum()) / total
    position_loss = [
        float(s / n) if n else None for s, n in zip(loss_sum.tolist(), counts.tolist(), strict=True)
    ]
    return PerplexityResult(
        loss=loss,
        ppl=math.exp(loss),
        tokens=total,
        windows=len(starts),
        seq_len=seq_len,
        stride=stride,
        position_loss=position_loss,
        position_tokens=counts.tolist(),
    )
