import pytest
import torch

from ratlm import LanguageModel, preset
from ratlm.generation import generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(preset("rat-tiny", layers="rat,swa", window=6, chunk_size=4, vocab_size=40)).eval()


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(5, 30)
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), best)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), best)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), best)


def test_top_k_and_top_p_never_sample_outside_the_kept_set():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    p = logits[0].softmax(-1)
    top_p = float(p[0] + p[1]) - 1e-4  # the two best tokens are needed to reach it
    assert set(sample_next(logits, 1.0, top_p=top_p, generator=g).tolist()) == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_arguments(bad):
    with pytest.raises(ValueError):
        sample_next(torch.randn(2, 5), **{"temperature": 1.0, **bad})


def test_greedy_generation_matches_the_full_forward(model):
    prompt = [3, 1, 4, 1, 5, 9, 2]
    out = generate(model, [prompt], max_new_tokens=12, temperature=0)[0]
    seq = prompt + out
    logits = model(torch.tensor([seq]))
    expected = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert out == expected


def test_batched_prompts_of_different_lengths_equal_one_by_one(model):
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 7, 7]]
    batched = generate(model, prompts, max_new_tokens=9, temperature=0)
    single = [generate(model, [p], max_new_tokens=9, temperature=0)[0] for p in prompts]
    assert batched == single
    assert all(len(o) == 9 for o in batched)


def test_sampling_is_reproducible_with_a_seed(model):
    a = generate(model, [[1, 2]], max_new_tokens=15, temperature=1.0, seed=3)
    b = generate(model, [[1, 2]], max_new_tokens=15, temperature=1.0, seed=3)
    assert a == b


def test_stop_ids_end_a_sequence(model):
    free = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0)[0]
    stop = free[3]
    out = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0, stop_ids=[stop])[0]
    assert out == free[: free.index(stop) + 1]


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=3)


def test_package_exports_the_generate_function():
    import ratlm
    import ratlm.generation

    assert ratlm.generate is ratlm.generation.generate


def test_equal_length_prompts_in_row_batches_equal_one_call(model):
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    whole = generate(model, prompts, max_new_tokens=6, temperature=0)
    in_rows = generate(model, prompts, max_new_tokens=6, temperature=0, prefill_rows=2)
    assert whole == in_rows


def reference_greedy_with_penalty(model, prompt, steps, penalty):
    """Greedy decoding with CTRL's repetition penalty, from the full forward at every step."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([seq]))[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(seq)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_a_full_forward_reference(model, penalty):
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    out = generate(model, prompts, max_new_tokens=8, temperature=0, repetition_penalty=penalty)
    for prompt, got in zip(prompts, out, strict=True):
        assert got == reference_greedy_with_penalty(model, prompt, 8, penalty)
    if penalty > 1:  # this tiny model repeats itself greedily: a penalty above 1 must change that
        assert out != generate(model, prompts, max_new_tokens=8, temperature=0)


def test_stop_strings_end_a_sequence_after_the_token_that_completes_them():
    from ratlm.tokenizer import ByteTokenizer

    torch.manual_seed(1)
    byte_model = LanguageModel(preset("rat-tiny", layers="rat,swa", window=6, chunk_size=4)).eval()
    tok = ByteTokenizer()
    prompt = tok.encode("To be")
    free = generate(byte_model, [prompt], max_new_tokens=12, temperature=0)[0]
    text = tok.decode(free)
    stop = text[4:6]  # completed by the sixth byte at the latest
    first = text.index(stop) + len(stop)
    out = generate(byte_model, [prompt, prompt], 12, temperature=0, stop_strings=[stop], tokenizer=tok)
    assert out == [free[:first], free[:first]]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(byte_model, [prompt], 3, stop_strings=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        generate(byte_model, [prompt], 3, stop_strings=["x", ""], tokenizer=tok)
    with pytest.raises(TypeError, match="list of strings"):
        generate(byte_model, [prompt], 3, stop_strings="x", tokenizer=tok)


def test_on_token_streams_every_kept_token_in_order(model):
    seen = []
    out = generate(model, [[1, 2], [3, 4, 5]], max_new_tokens=5, temperature=0,
                   on_token=lambda row, tok: seen.append((row, tok)))  # fmt: skip
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == out[row]


def test_a_too_short_cache_raises_before_any_work(model):
    from ratlm.cache import CacheOverflowError

    cache = model.new_cache(1, 8)
    cache.layers[0].seen = 3  # anything generate touched would be reset
    with pytest.raises(CacheOverflowError, match="needs a cache of 12"):
        generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=8, cache=cache)
    assert cache.seen == 3
    with pytest.raises(ValueError, match="2 prompts"):
        generate(model, [[1], [2]], max_new_tokens=2, cache=cache)


def test_a_given_cache_is_reused(model):
    prompts = [[1, 2, 3], [4, 5]]
    cache = model.new_cache(2, 20)
    first = generate(model, prompts, max_new_tokens=7, temperature=0, cache=cache)
    again = generate(model, prompts, max_new_tokens=7, temperature=0, cache=cache)
    assert first == again == generate(model, prompts, max_new_tokens=7, temperature=0)


def test_decode_step_eager_equals_decode_one_token(model):
    from ratlm.generation import DecodeStep, decode_one_token, prefill

    prompts = [[1, 2, 3], [4, 5, 6]]
    a, b = model.new_cache(2, 8), model.new_cache(2, 8)
    prefill(model, a, prompts)
    prefill(model, b, prompts)
    step = DecodeStep(model, a, cuda_graph=False)
    ids = torch.tensor([7, 8])
    for _ in range(4):
        x, y = step(ids), decode_one_token(model, b, ids)
        assert torch.equal(x, y)
        ids = x.argmax(-1)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeStep(model, a, cuda_graph=True)


def test_compiled_decode_step_equals_decode_one_token(model):
    """DecodeStep(compile=True), through torch.compile (Inductor on the CPU: ~25 s), gives the same logits."""
    from ratlm.generation import DecodeStep, decode_one_token, prefill

    prompts = [[1, 2, 3], [4, 5]]
    a, b = model.new_cache(2, 8), model.new_cache(2, 8)
    prefill(model, a, prompts)
    prefill(model, b, prompts)
    step = DecodeStep(model, a, cuda_graph=False, compile=True)
    ids = torch.tensor([7, 8])
    with torch.no_grad():
        for _ in range(3):
            x, y = step(ids), decode_one_token(model, b, ids)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
            ids = x.argmax(-1)


def test_decode_step_counts_each_token_once_when_its_compile_runs_eagerly(model):
    """A compiled step that dynamo runs eagerly (TORCH_COMPILE_DISABLE=1, or past its recompile limit) moves
    the host counters itself: the step must not count the token a second time."""
    from ratlm.generation import DecodeStep, prefill

    cache = model.new_cache(2, 12)
    prefill(model, cache, [[1, 2, 3], [4, 5, 6]])
    with torch._dynamo.config.patch(disable=True):
        step = DecodeStep(model, cache, cuda_graph=False, compile=True)
        for token in range(5):
            step(torch.tensor([token, token]))
    assert [state.seen for state in cache.layers] == [8] * len(cache.layers)
    assert all(int(state.pos.max()) == int(state.pos.min()) == 8 for state in cache.layers)


def test_cli_streams_a_single_prompt(tmp_path, capsys):
    from ratlm.cli import main

    torch.manual_seed(0)
    LanguageModel(preset("rat-tiny")).save_pretrained(tmp_path / "m")
    args = ["generate", "--model", str(tmp_path / "m"), "--tokenizer", "byte", "--device", "cpu", "--greedy"]
    args += ["--max-new-tokens", "6", "--prompt", "ab"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out == streamed and streamed.startswith("ab")
    completion = streamed[2:-1]
    stop = completion[1]
    assert main([*args, "--stop", stop, "--repetition-penalty", "1.0"]) == 0
    assert capsys.readouterr().out == "ab" + completion[: completion.index(stop) + 1] + "\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layers", ["rat", "rat,swa", "attn,rnn"])
def test_cuda_graph_decode_equals_eager_and_the_full_forward(layers):
    from ratlm.generation import DecodeStep, prefill

    torch.manual_seed(0)
    m = LanguageModel(preset("rat-small", layers=layers, window=20)).cuda().eval()
    prompts = [torch.randint(0, 257, (n,)).tolist() for n in (5, 40, 17)]  # ragged: positions differ per row
    with torch.no_grad():
        graphed, eager = m.new_cache(3, 80), m.new_cache(3, 80)
        first = prefill(m, graphed, prompts)
        prefill(m, eager, prompts)
        step_g, step_e = DecodeStep(m, graphed, cuda_graph=True), DecodeStep(m, eager, cuda_graph=False)
        tokens, logits = [first.argmax(-1)], []
        for _ in range(30):
            g, e = step_g(tokens[-1]), step_e(tokens[-1])
            assert torch.equal(g, e)  # the same kernels, replayed
            logits.append(e.clone())
            tokens.append(e.argmax(-1))
        assert graphed.seen == eager.seen and torch.equal(graphed.layers[0].pos, eager.layers[0].pos)
        for i, p in enumerate(prompts):
            seq = torch.tensor([p + [int(t[i]) for t in tokens[:-1]]], device="cuda")
            full = m(seq)[0, len(p) :]
            torch.testing.assert_close(torch.stack([x[i] for x in logits]), full, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_decode_benchmark_runs_at_toy_sizes(tmp_path, capsys):
    """`python -m ratlm.bench.decode --tiny`: the GPU benchmark's code paths, on the CPU at toy sizes."""
    import json

    from ratlm.bench.decode import main

    args = ["--tiny", "--phases", "latency,throughput", "--models", "rat-swa-1.3b", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_decode.jsonl").read_text().splitlines()]
    done = {(r["phase"], r["case"]): r for r in rows if r.get("status") == "ok"}
    assert done[("latency", "rat-swa-1.3b")]["greedy_agreement_with_full_forward"] == 1.0
    assert done[("throughput", "rat-swa-1.3b")]["tokens_per_s"] > 0
    assert "| throughput | rat-swa-1.3b |" in capsys.readouterr().out
