"""Perplexity over windows: the numbers a window-by-window computation gives, each token scored once
(strides included), targets right after EOS never scored, chunked cached feeding equal to the forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ratlm import LanguageModel, preset
from ratlm.evaluation.inputs import EvalDataError, TokenStream
from ratlm.evaluation.perplexity import evaluate_perplexity, token_losses

EOS = 256


def stream_of(n: int, seed: int = 0, eos_every: int = 23) -> TokenStream:
    tokens = np.random.default_rng(seed).integers(0, 256, n)
    tokens[eos_every - 1 :: eos_every] = EOS
    return TokenStream(tokens=tokens, eos_id=EOS, name="random")


def reference(model, stream: TokenStream, seq_len: int, stride: int) -> tuple[float, int]:
    """Window by window, plainly: (mean loss, scored targets)."""
    tokens = torch.from_numpy(stream.tokens)
    total, count = 0.0, 0
    for k, start in enumerate(range(0, len(tokens) - seq_len, stride)):
        x, y = tokens[start : start + seq_len], tokens[start + 1 : start + seq_len + 1]
        with torch.no_grad():
            losses = F.cross_entropy(model(x[None])[0], y, reduction="none")
        for t in range(0 if k == 0 else seq_len - stride, seq_len):
            if x[t] != EOS:
                total, count = total + float(losses[t]), count + 1
    return total / count, count


@pytest.mark.parametrize("seq_len, stride", [(16, None), (16, 5), (10, 3)])
def test_matches_a_window_by_window_computation(tiny_model, seq_len, stride):
    stream = stream_of(70)
    r = evaluate_perplexity(tiny_model, stream, seq_len, stride, batch_size=3)
    loss, count = reference(tiny_model, stream, seq_len, stride or seq_len)
    assert r.tokens == count == sum(r.position_tokens)
    assert r.loss == pytest.approx(loss, rel=1e-5) and r.ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert r.windows == len(range(0, 70 - seq_len, stride or seq_len))


def test_strided_windows_score_every_token_once(tiny_model):
    stream = TokenStream(tokens=np.arange(61) % 200, eos_id=None, name="no eos")
    r = evaluate_perplexity(tiny_model, stream, seq_len=16, stride=4)
    # windows start at 0, 4, ..., 44; targets 1..60 are each scored once
    assert r.windows == 12 and r.tokens == 60
    assert r.position_tokens == [1] * 12 + [12] * 4
    assert r.position_loss[0] is not None


def test_uniform_model_gives_the_vocabulary_size():
    model = LanguageModel(preset("rat-tiny", vocab_size=300)).eval()
    torch.nn.init.zeros_(model.embed.weight)  # every logit 0: loss ln(300) for every token
    r = evaluate_perplexity(model, stream_of(80), seq_len=10, batch_size=4)
    assert r.loss == pytest.approx(math.log(300)) and r.ppl == pytest.approx(300)
    assert r.tokens == 70 - sum(1 for t in stream_of(80).tokens[:70] if t == EOS)


def test_chunked_feeding_through_the_cache_equals_the_forward(tiny_model):
    ids = torch.randint(0, 257, (2, 37))
    targets = torch.randint(0, 257, (2, 37))
    targets[0, 5] = -100
    full = token_losses(tiny_model, ids, targets)
    torch.testing.assert_close(token_losses(tiny_model, ids, targets, chunk=8), full, rtol=1e-5, atol=1e-5)
    assert full[0, 5] == 0


def test_bad_requests(tiny_model):
    with pytest.raises(EvalDataError, match="needs 65"):
        evaluate_perplexity(tiny_model, stream_of(50), seq_len=64)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(tiny_model, stream_of(50), seq_len=8, stride=9)
    big = TokenStream(tokens=np.array([1, 2, 300, 4]), eos_id=None, name="big")
    with pytest.raises(EvalDataError, match="vocabulary"):
        evaluate_perplexity(tiny_model, big, seq_len=2)
