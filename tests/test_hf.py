"""transformers integration: ratlm directories load through the Auto classes with the same logits, save
back in ratlm's format, keep their gate biases, and greedy generate() equals ratlm's own generation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import ratlm
from ratlm import LanguageModel, preset
from ratlm.checkpoint import save_pretrained
from ratlm.config import ConfigError, ModelConfig
from ratlm.tokenizer import ByteTokenizer

try:
    from ratlm.generation import generate
except ImportError:  # ratlm before generate.py became generation.py
    from ratlm.generate import generate

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ratlm.hf import RatConfig, RatForCausalLM  # noqa: E402

VOCAB = 40


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A hybrid RAT / sliding-window model saved by ratlm, and the model itself."""
    torch.manual_seed(0)
    config = preset("rat-tiny", layers="rat,swa", window=6, chunk_size=4, vocab_size=VOCAB)
    model = LanguageModel(config).eval()
    directory = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(directory)
    return directory, model


def test_importing_ratlm_leaves_transformers_alone_until_it_is_imported():
    # This process imported ratlm before transformers, so the hook registered the classes here. In a
    # fresh one: the hook must survive an availability check, and registration must also happen when
    # it is ratlm.hf.modeling that imports transformers.
    code = (
        "import importlib.util, sys, ratlm\n"
        "assert 'transformers' not in sys.modules\n"
        "assert importlib.util.find_spec('transformers') is not None\n"
        "from ratlm.hf import RatConfig, RatForCausalLM\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "assert type(AutoConfig.for_model('ratlm')) is RatConfig\n"
        "assert AutoModelForCausalLM._model_mapping[RatConfig] is RatForCausalLM\n"
    )
    subprocess.run([sys.executable, "-W", "error:ratlm:UserWarning", "-c", code], check=True, timeout=300)


def test_auto_classes_load_a_ratlm_directory(saved):
    directory, model = saved
    hf = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(hf, RatForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(directory), RatConfig)
    assert hf.lm_head.weight is hf.model.embed.weight
    loaded = hf.model.state_dict()
    for name, tensor in model.state_dict().items():  # gate biases included: not re-initialised
        assert torch.equal(loaded[name], tensor), name
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)


def test_save_pretrained_writes_ratlm_format(saved, tmp_path):
    directory, model = saved
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written == {"model_type": "ratlm", **model.config.to_dict()}
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    reloaded = ratlm.from_pretrained(tmp_path / "again")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_converted_style_directory_keeps_its_dtype_and_provenance(tmp_path):
    # `ratlm convert-official` writes this layout: bf16 weights, provenance in `extra`, a tokenizer.
    config = preset("rat-tiny", vocab_size=257, extra={"converted_from": "reference", "step": None})
    model = LanguageModel(config).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "conv", tokenizer=ByteTokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    assert hf.dtype == torch.bfloat16
    assert hf.config.extra == config.extra and hf.config.to_ratlm() == config


def test_greedy_generate_equals_ratlm_generation(saved):
    directory, model = saved
    hf = AutoModelForCausalLM.from_pretrained(directory)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]]
    out = hf.generate(torch.tensor(prompts), max_new_tokens=15, do_sample=False)
    assert out[:, 7:].tolist() == generate(model, prompts, 15, temperature=0)
    hf.cache_slack = 2  # the cache must grow (and replay the sequence) twice on the way
    out = hf.generate(torch.tensor(prompts[:1]), max_new_tokens=15, do_sample=False)
    assert out[0, 7:].tolist() == generate(model, prompts[:1], 15, temperature=0)[0]


def test_padded_batches_are_refused(saved):
    hf = AutoModelForCausalLM.from_pretrained(saved[0])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="no attention mask"):
        hf.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), attention_mask=mask, max_new_tokens=2)


def test_a_new_model_gets_ratlm_init():
    config = preset("rat-tiny", layers="rat,rnn", chunk_size=8, vocab_size=VOCAB)
    hf = RatForCausalLM(RatConfig.from_ratlm(config))
    for block in hf.model.blocks:
        bias = block.mixer.gate_bias
        high = config.chunk_size - 1 if block.mixer.__class__.__name__ == "RAT" else config.context - 1
        assert bias.min() >= 0 and bias.max() <= torch.log(torch.tensor(float(high))) and bias.std() > 0.1
        assert torch.equal(block.ffn.norm.weight, torch.ones_like(block.ffn.norm.weight))
    assert abs(float(hf.model.embed.weight.detach().std()) - config.init_std) < 0.002
    assert hf.lm_head.weight is hf.model.embed.weight


def test_config_mirrors_model_config():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert names <= {f.name for f in dataclasses.fields(RatConfig)}
    assert RatConfig().to_ratlm() == ModelConfig()
    with pytest.raises(ConfigError, match="n_groups"):
        RatConfig(n_heads=4, n_groups=3)
