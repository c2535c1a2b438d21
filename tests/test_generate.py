import pytest
import torch

from ratlm import LanguageModel, preset
from ratlm.generate import generate, sample_next


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
