"""The inference cache: static buffers, device positions, row views, ragged batches, memory planning."""

import copy

import pytest
import torch

from ratlm import LanguageModel, ModelConfig, preset
from ratlm.cache import (
    CacheOverflowError,
    KVState,
    RATState,
    RNNState,
    WindowState,
    cache_bytes_per_sequence,
    plan_batch,
    row_tensors,
)

V = 61
HYBRIDS = ["rat", "attn", "swa", "rnn", "rat,attn,rnn,swa"]


def tiny_model(layers: str = "rat,attn,rnn,swa", **changes) -> LanguageModel:
    base = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, n_groups=2, d_ffn=128, context=32)
    return LanguageModel(
        ModelConfig(**{**base, "layers": layers, "chunk_size": 4, "window": 3, **changes})
    ).eval()


def poison(cache) -> None:
    """NaN in every cached key/value slot: a slot read before it is written shows in the logits."""
    for state in cache.layers:
        for name in ("keys", "values"):
            if hasattr(state, name):
                getattr(state, name).fill_(float("nan"))


def test_states_carry_device_positions_and_shared_rope_tables():
    model = tiny_model("rat,attn,rnn,swa", n_layers=8)
    cache = model.new_cache(3, 10)
    kinds = [type(s) for s in cache.layers]
    assert kinds[:4] == [RATState, KVState, RNNState, WindowState]
    for state in cache.layers:
        assert state.pos.shape == (3,) and state.pos.dtype == torch.int64 and state.seen == 0
    rat, attn, swa = cache.layers[0], cache.layers[1], cache.layers[3]
    assert rat.rope.shape == (3, 8)  # ceil(10 / 4) chunk indices, head width 8
    assert attn.rope.shape == swa.rope.shape == (10, 8)  # token positions: a ring buffer sees max_len too
    assert rat.rope is cache.layers[4].rope and attn.rope is swa.rope is cache.layers[5].rope  # built once
    assert cache.table_nbytes == (3 + 10) * 8 * 4
    assert cache.nbytes == sum(getattr(s, n).nbytes for s in cache.layers for n in row_tensors(s))


def test_nope_layers_get_empty_tables():
    cache = tiny_model("rat,swa", position="nope").new_cache(2, 9)
    assert all(s.rope.shape == (0, 8) for s in cache.layers)


def test_cache_bytes_per_sequence_is_what_new_cache_allocates_per_row():
    model = tiny_model()
    for max_len in (1, 7, 33):
        assert cache_bytes_per_sequence(model, max_len) * 5 == model.new_cache(5, max_len).nbytes
    assert cache_bytes_per_sequence(model, 33, torch.bfloat16) < cache_bytes_per_sequence(model, 33)


def test_rows_are_views_that_fill_the_whole_cache():
    model = tiny_model()
    ids = torch.randint(0, V, (4, 6))
    with torch.no_grad():
        whole = model.new_cache(4, 8)
        model(ids, whole)
        parts = model.new_cache(4, 8)
        model(ids[:3], parts.rows(0, 3))
        model(ids[3:], parts.rows(3, 4))
    assert parts.seen == 0  # the views moved their own host counters: the caller says where rows stand
    parts.set_positions([6] * 4)
    assert parts.seen == 6 and not parts.ragged
    for a, b in zip(whole.layers, parts.layers, strict=True):
        for name in [*row_tensors(a), "pos"]:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        parts.rows(2, 5)


@pytest.mark.parametrize("layers", HYBRIDS)
def test_ragged_rows_decode_like_single_sequences(layers):
    """Sequences prefilled at different lengths then decoded together equal each sequence on its own."""
    model = tiny_model(layers)
    lens, steps = [3, 9, 6], 5
    seqs = [torch.randint(0, V, (n + steps,)) for n in lens]
    with torch.no_grad():
        cache = model.new_cache(3, max(lens) + steps)
        poison(cache)
        for i, n in enumerate(lens):
            model(seqs[i][None, :n], cache.rows(i, i + 1))
        cache.set_positions(lens)
        assert cache.ragged and cache.seen == max(lens)
        steps_out = [model(torch.stack([s[n + t] for s, n in zip(seqs, lens, strict=True)])[:, None], cache)
                     for t in range(steps)]  # fmt: skip
        for i, n in enumerate(lens):
            full = model(seqs[i][None])[0, n:]
            got = torch.stack([out[i, 0] for out in steps_out])
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].pos.tolist() == [n + steps for n in lens]
    with pytest.raises(ValueError, match="different positions"):
        model(torch.randint(0, V, (3, 2)), cache)  # only one token per sequence while ragged


def test_decode_overflow_raises_before_touching_the_cache():
    model = tiny_model()
    with torch.no_grad():
        cache = model.new_cache(2, 5)
        model(torch.randint(0, V, (2, 5)), cache)
        snap = copy.deepcopy(cache)
        with pytest.raises(CacheOverflowError, match="max_len"):
            model(torch.randint(0, V, (2, 1)), cache)
    for a, b in zip(cache.layers, snap.layers, strict=True):
        assert a.seen == b.seen
        for name in [*row_tensors(a), "pos"]:
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_reset_clears_positions_and_keeps_tables():
    model = tiny_model()
    cache = model.new_cache(2, 9)
    with_tables = [s for s in cache.layers if hasattr(s, "rope")]
    tables = [s.rope for s in with_tables]
    with torch.no_grad():
        model(torch.randint(0, V, (2, 4)), cache)
    cache.set_positions([4, 2])
    cache.reset()
    assert cache.seen == 0 and not cache.ragged
    assert all(s.pos.tolist() == [0, 0] for s in cache.layers)
    assert all(s.rope is t and t.abs().sum() > 0 for s, t in zip(with_tables, tables, strict=True))


@pytest.mark.parametrize("name", ["rat-1.3b", "attn-1.3b", "rat-swa-1.3b"])
def test_plan_batch_fills_free_memory_without_exceeding_it(name):
    with torch.device("meta"):
        model = LanguageModel(preset(name)).to(torch.bfloat16)
    free = 100 * 2**30
    plan = plan_batch(model, 4096, 3072, free=free)
    per_sequence = plan.cache_bytes_per_sequence + plan.decode_bytes_per_sequence
    used = plan.batch_size * per_sequence + plan.prefill_bytes + plan.table_bytes + plan.reserve_bytes
    assert used <= free < used + per_sequence  # the largest batch: one more sequence would not fit
    assert plan.cache_bytes_per_sequence == cache_bytes_per_sequence(model, 4096)
    assert 1 <= plan.prefill_rows <= plan.batch_size
    assert str(plan.batch_size) in str(plan)


def test_plan_batch_rat_fits_more_sequences_than_attention():
    with torch.device("meta"):
        rat, attn = (LanguageModel(preset(n)).to(torch.bfloat16) for n in ("rat-1.3b", "attn-1.3b"))
    free = 120 * 2**30
    # RAT's cache is L = 16 times smaller (plus its fp32 running states)
    assert plan_batch(rat, 4096, free=free).batch_size > 10 * plan_batch(attn, 4096, free=free).batch_size
    assert plan_batch(attn, 4096, free=2**30).batch_size == 0  # a reserve larger than what is free
