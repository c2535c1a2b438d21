"""The language model: cache equals full forward, input checks, gradients, presets, config, init."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pieces import piece_sizes

import ratlm.mixers.attention
import ratlm.mixers.rat
import ratlm.mixers.rnn
from ratlm import PRESETS, LanguageModel, ModelCache, ModelConfig, preset
from ratlm.cache import CacheOverflowError
from ratlm.config import ConfigError
from ratlm.mixers import RAT, RNN
from ratlm.ops import attention_naive, gated_scan_naive, rat_mix_naive

V = 61
HYBRIDS = ["rat", "attn", "swa", "rnn", "rat,swa", "rat,attn,rnn,swa"]


def tiny(layers: str = "rat,attn,rnn,swa", **changes) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, n_groups=2, d_ffn=128, context=32)
    return ModelConfig(**{**base, "layers": layers, "chunk_size": 4, "window": 3, **changes})


def tiny_model(layers: str = "rat,attn,rnn,swa", **changes) -> LanguageModel:
    return LanguageModel(tiny(layers, **changes)).eval()


def feed(model: LanguageModel, ids: torch.Tensor, cache: ModelCache, sizes: list[int]) -> torch.Tensor:
    outs, p = [], cache.seen
    for n in sizes:
        outs.append(model(ids[:, p : p + n], cache))
        p += n
    return torch.cat(outs, 1)


def snapshot(cache: ModelCache) -> list[dict]:
    return [copy.deepcopy(vars(s)) for s in cache.layers]


def assert_same_cache(cache: ModelCache, snap: list[dict]) -> None:
    for layer, saved in zip(cache.layers, snap, strict=True):
        for key, value in saved.items():
            now = getattr(layer, key)
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key


# (chunk size L, window W, tokens T): a prompt shorter than one chunk, T % L != 0, W below and above T
@pytest.mark.parametrize("L, W, T", [(16, 20, 7), (4, 3, 11), (4, 30, 13), (1, 2, 6)])
@pytest.mark.parametrize("how", ["whole", "tokens", "random"])
@pytest.mark.parametrize("layers", HYBRIDS)
def test_cache_in_pieces_equals_full_forward(layers, how, L, W, T):
    model = tiny_model(layers, chunk_size=L, window=W)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, T + 3)
        for state in cache.layers:  # NaN in every key/value slot: reading one before writing it shows
            for name in ("keys", "values"):
                if hasattr(state, name):
                    getattr(state, name).fill_(float("nan"))
        logits = feed(model, ids, cache, piece_sizes(T, how))
    assert cache.seen == T
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_overflow_raises_and_leaves_the_cache_untouched():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, max_len=8)
        first = model(ids[:, :6], cache)
        snap = snapshot(cache)
        with pytest.raises(CacheOverflowError, match="max_len") as err:
            model(torch.randint(0, V, (2, 3)), cache)
        assert isinstance(err.value, ValueError)
        assert_same_cache(cache, snap)
        rest = model(ids[:, 6:], cache)  # the cache still works, and is now exactly full
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(CacheOverflowError):
        model(ids[:, :1], cache)


@pytest.mark.parametrize("bad", [-1, V, V + 100])
def test_token_outside_vocab_raises(bad):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 5))
    ids[1, 3] = bad
    with pytest.raises(ValueError, match="vocabulary") as err:
        model(ids)
    assert str(bad) in str(err.value) and str(V) in str(err.value)
    cache = model.new_cache(2, 8)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="vocabulary"):
        model(ids, cache)
    assert_same_cache(cache, snap)


def test_batch_mismatch_with_cache_raises():
    model = tiny_model()
    cache = model.new_cache(2, 8)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.randint(0, V, (3, 4)), cache)
    assert_same_cache(cache, snap)


def greedy(model: LanguageModel, prompt: torch.Tensor, cache: ModelCache, steps: int) -> list[torch.Tensor]:
    logits = [model(prompt, cache)[:, -1]]
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
    return logits


def test_reset_gives_identical_second_generation():
    model = tiny_model()
    prompt = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        first = greedy(model, prompt, cache, 9)
        assert cache.seen == 15
        cache.reset()
        assert cache.seen == 0
        second = greedy(model, prompt, cache, 9)
        fresh = greedy(model, prompt, model.new_cache(2, 16), 9)
    for a, b, c in zip(first, second, fresh, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def loss_and_grads(model: LanguageModel, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layers", ["rat,attn,rnn,swa", "rat"])
def test_grads_finite_and_equal_to_naive_ops(layers, monkeypatch):
    model = tiny_model(layers, chunk_size=4).train()
    ids = torch.randint(0, V, (2, 15))  # 14 inputs: T % L != 0
    loss, grads = loss_and_grads(model, ids)
    params = dict(model.named_parameters())
    assert set(grads) == set(params)
    assert any("gate_bias" in n for n in grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name

    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ratlm.mixers.rat, "rat_mix", counted(rat_mix_naive))
    monkeypatch.setattr(ratlm.mixers.attention, "attention", counted(attention_naive))
    monkeypatch.setattr(ratlm.mixers.rnn, "gated_scan", counted(gated_scan_naive))
    loss_naive, grads_naive = loss_and_grads(model, ids)
    used = {"rat_mix_naive"} if layers == "rat" else {"rat_mix_naive", "attention_naive", "gated_scan_naive"}
    assert set(calls) == used
    torch.testing.assert_close(loss, loss_naive, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_naive[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: n + m)


def test_bf16_autocast_forward_close_to_fp32(monkeypatch):
    """Tolerance rule: the autocast error against fp32 at most ~2x that of the same model on naive ops."""
    model = tiny_model()
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        ref = model(ids).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(ids).double()
        monkeypatch.setattr(ratlm.mixers.rat, "rat_mix", rat_mix_naive)
        monkeypatch.setattr(ratlm.mixers.attention, "attention", attention_naive)
        monkeypatch.setattr(ratlm.mixers.rnn, "gated_scan", gated_scan_naive)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive = model(ids).double()
    assert torch.isfinite(fast).all()
    err, err_naive = (fast - ref).abs().max(), (naive - ref).abs().max()
    assert err <= 2 * err_naive, (err, err_naive)
    assert err < 0.05 * ref.abs().max()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def expected_params(cfg: ModelConfig) -> int:
    """From the shapes of SPEC §1-2: tied embedding, per-layer mixer + FFN + their norms, final norm."""
    D, Gd = cfg.d_model, cfg.n_groups * cfg.head_dim
    mixer = {
        # input_norm, in_proj (z, x, g, q, k), gate_bias, out_proj
        "rat": D + D * (3 * D + 2 * Gd) + D + D * D,
        "attn": D + D * 3 * D + D * D,  # input_norm, in_proj (x, q, k), out_proj
        "swa": D + D * 3 * D + D * D,
        "rnn": D + D * 3 * D + D + D * D,  # input_norm, in_proj (z, x, g), gate_bias, out_proj
    }
    ffn = D + 2 * D * 4 * D
    return cfg.vocab_size * D + sum(mixer[m] + ffn for m in cfg.pattern) + D


PAPER_PRESETS = ["attn-1.3b", "rat-1.3b", "rnn-1.3b", "attn-swa-1.3b", "rat-swa-1.3b"]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_build_on_meta_with_expected_param_count(name):
    cfg = preset(name)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim) == (24, 2048, 16, 128)
    assert cfg.vocab_size == 32000
    assert cfg.d_ffn == 4 * cfg.d_model and cfg.context == 4096
    if "rat" in cfg.pattern:
        assert (cfg.chunk_size, cfg.n_groups) == (16, 2)
    if "swa" in cfg.pattern:
        assert cfg.window == 1024
    if "-swa-" in name:  # hybrids: the first mixer at even layers, sliding window at odd ones
        assert cfg.pattern[1::2] == ["swa"] * 12 and "swa" not in cfg.pattern[0::2]
    with torch.device("meta"):
        model = LanguageModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == expected_params(cfg)
    assert 1.2e9 < model.num_params() < 1.45e9


def test_rat_1_3b_count_by_hand():
    """The same count, written as numbers: D 2048, G d = 256, 24 layers, vocab 32000."""
    rat = 2048 + 2048 * (3 * 2048 + 2 * 256) + 2048 + 2048 * 2048
    ffn = 2048 + 2 * 2048 * 8192
    with torch.device("meta"):
        assert LanguageModel(preset("rat-1.3b")).num_params() == 32000 * 2048 + 24 * (rat + ffn) + 2048


def test_logits_use_the_tied_embedding():
    """SPEC §2: unscaled embedding -> blocks -> final norm -> logits with the embedding matrix itself."""
    model = tiny_model()
    assert sum(p.shape == (V, 32) for p in model.parameters()) == 1  # no separate output matrix
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        h = model.embed.weight[ids]
        for block in model.blocks:
            h = block(h)
        expected = F.rms_norm(h, (32,), model.norm.weight, 1e-6) @ model.embed.weight.T
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_every_preset_builds():
    assert set(PAPER_PRESETS) <= set(PRESETS)
    for name in PRESETS:
        assert preset(name).pattern


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(n_groups=3), "n_groups"),
        (dict(n_groups=0), "n_groups"),
        (dict(d_model=30), "d_model"),
        (dict(layers="rat,mamba"), "mamba"),
        (dict(layers="rat,mamba"), "layers"),
        (dict(layers=" , "), "layers"),
        (dict(window=-1, layers="swa"), "window"),
        (dict(position="alibi"), "position"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as err:
        tiny(**{"layers": "rat,swa", **changes})
    assert isinstance(err.value, ValueError)


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="unknown preset 'rat-7b'") as err:
        preset("rat-7b")
    assert isinstance(err.value, ValueError) and "rat-1.3b" in str(err.value)


def gate_biases(model: LanguageModel, cls) -> torch.Tensor:
    return torch.cat([b.mixer.gate_bias for b in model.blocks if isinstance(b.mixer, cls)])


@pytest.mark.parametrize("L", [4, 16, 64])
def test_rat_gate_bias_init_is_log_uniform_1_to_L_minus_1(L):
    bias = gate_biases(LanguageModel(tiny("rat", d_model=256, chunk_size=L, n_layers=2)), RAT)
    assert bias.min() >= 0 and bias.max() <= math.log(L - 1) + 1e-6
    # log of a uniform sample: median log(L / 2), known mean, reaching the top of the range
    assert abs((bias < math.log(L / 2)).float().mean().item() - 0.5) < 0.1
    assert bias.max() > math.log(L - 1) - 0.1
    expected_mean = ((L - 1) * math.log(L - 1) - (L - 1) + 1) / (L - 2)
    assert abs(bias.mean().item() - expected_mean) < 0.1


def test_rnn_gate_bias_init_is_log_uniform_1_to_context_minus_1():
    bias = gate_biases(LanguageModel(tiny("rnn", d_model=256, context=128, n_layers=2)), RNN)
    assert bias.min() >= 0 and bias.max() <= math.log(127) + 1e-6
    assert abs((bias < math.log(64)).float().mean().item() - 0.5) < 0.1
    assert bias.max() > math.log(127) - 0.1


def test_rat_gate_bias_init_for_chunk_size_one_is_the_documented_constant():
    assert ModelConfig().rat_l1_gate_bias == -4.0  # documented next to the field in config.py
    bias = gate_biases(LanguageModel(tiny("rat", chunk_size=1)), RAT)
    assert torch.equal(bias, torch.full_like(bias, -4.0))
    bias = gate_biases(LanguageModel(tiny("rat", chunk_size=1, rat_l1_gate_bias=-2.5)), RAT)
    assert torch.equal(bias, torch.full_like(bias, -2.5))


def test_init_weights_normal_and_norms_one():
    model = LanguageModel(tiny(d_model=128, d_ffn=512))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002, name
