"""Generation: prefill, one-token decode steps (eager or replayed from a CUDA graph), batched sampling.

Small free functions around a static, preallocated cache: `prefill` feeds the prompts, `decode_one_token`
and `DecodeStep` take one token per sequence (the step reads every position from the cache's device counters,
so one captured CUDA graph serves every step), `sample_next` picks the next tokens of the whole batch at once,
and `generate` ties them together. Memory planning (`plan_batch`) lives in `ratlm.cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .cache import CacheOverflowError, ModelCache
from .model import LanguageModel
from .ops.compiling import with_recompile_room


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row of logits [B, V]: greedy if temperature == 0, else filtered sampling."""
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on the tokens marked in seen [B, V]: positive logits divided by it, negative ones
    multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def prefill(
    model: LanguageModel,
    cache: ModelCache,
    prompts: Sequence[Sequence[int]],
    rows_per_call: int | None = None,
) -> Tensor:
    """Feed every prompt into its row of an empty cache; the logits [B, V] after each prompt's last token.

    Prompts of one length go in together, rows_per_call sequences per forward (all by default: fewer bound
    the activation memory of a large batch). Prompts of different lengths go one sequence at a time, each at
    its own length, leaving the cache ragged: every sequence then decodes from its own position.
    """
    if cache.seen != 0:
        raise ValueError("prefill needs an empty cache (see ModelCache.reset)")
    if len(prompts) != cache.batch_size or any(len(p) == 0 for p in prompts):
        raise ValueError(f"need {cache.batch_size} non-empty prompts, got {[len(p) for p in prompts]}")
    if rows_per_call is not None and rows_per_call < 1:
        raise ValueError(f"rows_per_call must be >= 1 or None (all rows), got {rows_per_call}")
    device = model.embed.weight.device
    B, lens = len(prompts), [len(p) for p in prompts]
    cache.check_room(max(lens))
    if len(set(lens)) > 1:
        rows_per_call = 1
        batches = [torch.tensor([p], device=device) for p in prompts]
    else:
        rows_per_call = min(rows_per_call or B, B)
        ids = torch.tensor([list(p) for p in prompts], device=device)
        batches = list(ids.split(rows_per_call))
    if rows_per_call == B:
        return model(batches[0], cache, last_only=True)[:, -1]
    logits = [
        model(ids, cache.rows(i * rows_per_call, i * rows_per_call + len(ids)), last_only=True)[:, -1]
        for i, ids in enumerate(batches)
    ]
    cache.set_positions(lens)  # the row views advanced their own host counters, not the whole cache's
    return torch.cat(logits)


def decode_one_token(model: LanguageModel, cache: ModelCache, ids: Tensor) -> Tensor:
    """Logits [B, V] after feeding one token per sequence (ids [B]) at each sequence's own position."""
    return model(ids[:, None], cache)[:, -1]


class DecodeStep:
    """`decode_one_token` on one cache, replayed from a CUDA graph on CUDA (or run eagerly).

    The first call runs eagerly on a side stream, which also warms up kernels, cuBLAS and the allocator; the
    second captures the step in a graph; later calls copy the tokens into the graph's input and replay it.
    The step reads positions from the cache's device counters, so the one graph serves every position.
    The logits returned after a replay live in a static buffer that the next call overwrites.
    compile=True runs the step through torch.compile first (fusing the small ops around the decode kernels;
    the first call then takes as long as the compilation).
    """

    def __init__(
        self, model: LanguageModel, cache: ModelCache, cuda_graph: bool | None = None, compile: bool = False
    ):
        device = model.embed.weight.device
        self.model, self.cache = model, cache
        self.step = decode_one_token
        if compile:  # one compiled entry per cache shape: room past dynamo's 8 (several caches in a process)
            self.step = with_recompile_room(torch.compile(decode_one_token, dynamic=False))
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed_up = False
        self.ids: Tensor | None = None
        self.logits: Tensor | None = None

    def __call__(self, ids: Tensor) -> Tensor:
        # checked here: a replay runs no host code, and a compiled step must not read host counters
        self.cache.check_room(1)
        seen = [state.seen for state in self.cache.layers]
        if self.use_graph and self.warmed_up:
            if self.graph is None:
                self._capture(ids)
            self.ids.copy_(ids)
            self.graph.replay()
            logits = self.logits
        elif not self.use_graph:
            logits = self.step(self.model, self.cache, ids)
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.step(self.model, self.cache, ids)
            torch.cuda.current_stream().wait_stream(side)
            self.warmed_up = True
        # one token further, whoever ran the step: a replay and a compiled step leave the host counters
        # alone, an eager one (also a compiled step that dynamo runs eagerly) moves them itself
        for state, n in zip(self.cache.layers, seen, strict=True):
            state.seen = n + 1
        return logits

    def _capture(self, ids: Tensor) -> None:
        self.ids = ids.clone()
        seen = [s.seen for s in self.cache.layers]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.model, self.cache, self.ids)
        # capturing ran the step's Python (an uncompiled one moved the host counters) but none of its kernels
        for state, n in zip(self.cache.layers, seen, strict=True):
            state.seen = n


def _stop_checker(stop_strings: Sequence[str], tokenizer) -> Callable[[list[int]], bool]:
    """Whether a sequence's output now contains a stop string; decodes only a tail long enough to hold one."""
    tail = 4 * max(len(s) for s in stop_strings) + 8  # tokens: a character may take up to 4 byte tokens

    def hit(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:])
        return any(s in text for s in stop_strings)

    return hit


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
    *,
    repetition_penalty: float = 1.0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
    cuda_graph: bool | None = None,
    prefill_rows: int | None = None,
    cache: ModelCache | None = None,
) -> list[list[int]]:
    """Continue each prompt (lists of token ids, any lengths) by up to max_new_tokens tokens.

    Every sequence sees exactly its prompt: prompts of different lengths are prefilled each at its own
    length, then all sequences decode together, each from its own position, so greedy decoding gives what
    one-by-one generation gives. Sampling applies, in order: repetition_penalty (CTRL's, over the prompt
    and the output so far; 1 = off), temperature (0 = greedy), top_k, top_p. A sequence ends after a token
    in stop_ids, or once its output contains one of stop_strings (decoded with `tokenizer`); the token
    that ends it is kept. on_token(row, token) sees every kept token as it comes (streaming). On CUDA the
    decode step is replayed from a CUDA graph unless cuda_graph=False. prefill_rows bounds the sequences
    per prefill forward; `cache` (batch len(prompts)) is reused instead of allocating one, after a reset.
    Raises CacheOverflowError before any work if `cache` is too short.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if isinstance(stop_strings, str):
        raise TypeError(f"stop_strings must be a list of strings, got the string {stop_strings!r}")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(
            f"stop_strings must be non-empty strings (an empty one matches at once), got {stop_strings!r}"
        )
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    _check_sampling(temperature, top_k, top_p)
    B, lens = len(prompts), [len(p) for p in prompts]
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    need = max(lens) + max_new_tokens - 1  # the last new token is never fed back
    device = model.embed.weight.device
    if cache is None:
        cache = model.new_cache(B, need, device=device)
    else:
        if cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} sequences, {B} prompts were given")
        if cache.max_len < need:
            raise CacheOverflowError(
                f"generating {max_new_tokens} tokens after a prompt of {max(lens)} needs a cache of {need} "
                f"tokens; this one holds {cache.max_len}"
            )
        cache.reset()
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    logits = prefill(model, cache, prompts, prefill_rows)
    step = DecodeStep(model, cache, cuda_graph)

    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(list(p), device=device)] = True
    rows = torch.arange(B, device=device)
    stops = set(stop_ids)
    hit_stop = _stop_checker(stop_strings, tokenizer) if stop_strings else None
    follow = bool(stops or hit_stop or on_token)  # otherwise no host sync until the end
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    sampled = []
    for t in range(max_new_tokens):
        scores = logits.float()
        if seen is not None:
            scores = apply_repetition_penalty(scores, seen, repetition_penalty)
        token = sample_next(scores, temperature, top_k, top_p, generator)
        if seen is not None:
            seen[rows, token] = True
        if follow:
            for i, tok in enumerate(token.tolist()):
                if done[i]:
                    continue
                outputs[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
                done[i] = tok in stops or (hit_stop is not None and hit_stop(outputs[i]))
            if all(done):
                break
        else:
            sampled.append(token)
        if t + 1 < max_new_tokens:
            logits = step(token)
    return outputs if follow else torch.stack(sampled, dim=1).tolist()


def generate_text(
    model: LanguageModel, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs
) -> list[str]:
    """Text in, text out; stops at the tokenizer's EOS (and at any of stop_strings if given)."""
    ids = [tokenizer.encode(p) for p in prompts]
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    outs = generate(model, ids, max_new_tokens, stop_ids=stop, tokenizer=tokenizer, **kwargs)
    return [tokenizer.decode(o) for o in outs]
