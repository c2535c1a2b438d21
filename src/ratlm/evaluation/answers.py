"""Greedy answers to many prompts of different lengths, in batches through `ratlm.generate`.

What LongBench and RULER share: prompts (token ids) are sorted by length, longest first, and cut into
batches; each batch is one `generate` call, which prefills every prompt at its own length and then decodes
the batch together (replaying a CUDA graph on a GPU) until every sequence has produced EOS or the token
budget. The batch size is planned from the memory left on the device (`ratlm.cache.plan_batch`) unless given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..cache import plan_batch
from ..generation import generate

MAX_AUTO_BATCH = 32  # beyond this a decode step of these models gains little from a larger batch


class LengthError(ValueError):
    """A prompt, or a prompt with its answer, that the model's memory cannot hold."""


def auto_batch_size(model, longest_prompt: int, max_new_tokens: int) -> int:
    """The largest batch (at most MAX_AUTO_BATCH) whose caches and activations fit in the free memory for
    prompts of up to longest_prompt tokens; LengthError when not even one sequence fits."""
    plan = plan_batch(model, longest_prompt + max_new_tokens, prompt_len=longest_prompt)
    if plan.batch_size < 1:
        raise LengthError(
            f"a prompt of {longest_prompt} tokens with {max_new_tokens} new tokens does not fit in the "
            f"memory of {model.embed.weight.device} ({plan}); use a shorter length"
        )
    return min(MAX_AUTO_BATCH, plan.batch_size)


@torch.no_grad()
def greedy_answers(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """The greedy continuation (token ids, EOS dropped) of every prompt, in the order given."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if batch_size is None:
        batch_size = auto_batch_size(model, len(prompts[order[0]]), max_new_tokens)
    stop = () if eos_id is None else (eos_id,)
    outputs: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            new = generate(model, [prompts[i] for i in rows], max_new_tokens, temperature=0.0, stop_ids=stop)
            for i, tokens in zip(rows, new, strict=True):
                outputs[i] = [t for t in tokens if t != eos_id]
            bar.update(len(rows))
    return outputs
