"""Sampling and batched generation through the preallocated inference cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .model import LanguageModel


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row of logits [B, V]: greedy if temperature == 0, else filtered sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (lists of token ids, any lengths) by up to max_new_tokens tokens.

    All prompts share one cache: the common prefix length is prefilled at once, then longer prompts are
    fed their own tokens while shorter ones already sample, so every sequence sees exactly its prompt.
    Generation of a sequence stops after a token in stop_ids (which is kept in its output).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.embed.weight.device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    total = max(lens) + max_new_tokens
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(B, max(total - 1, 1), device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens == 0] * B
    pos = min(lens)
    logits = model(torch.tensor([list(p[:pos]) for p in prompts], device=device), cache=cache)[:, -1]
    while not all(done):
        sampled = sample_next(logits, temperature, top_k, top_p, generator).tolist()
        step = []
        for i in range(B):
            if pos < lens[i]:
                step.append(prompts[i][pos])
                continue
            step.append(sampled[i])
            if not done[i]:
                outputs[i].append(sampled[i])
                done[i] = len(outputs[i]) >= max_new_tokens or sampled[i] in stop_ids
        if all(done):
            break
        logits = model(torch.tensor(step, device=device)[:, None], cache=cache)[:, -1]
        pos += 1
    return outputs


def generate_text(
    model: LanguageModel, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs
) -> list[str]:
    """Text in, text out; stops at the tokenizer's EOS."""
    ids = [tokenizer.encode(p) for p in prompts]
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    outs = generate(model, ids, max_new_tokens, stop_ids=stop, **kwargs)
    return [tokenizer.decode(o) for o in outs]
