"""Reference checkpoints (SPEC §3) convert to ratlm directories with the same logits, load safely, and
fail with CheckpointError naming the problem. The checkpoints are built here in the reference format."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ratlm
from ratlm import convert
from ratlm.checkpoint import CheckpointError
from ratlm.config import ModelConfig
from ratlm.convert import config_from_official, convert_official, load_official
from ratlm.model import LanguageModel
from ratlm.tokenizer import load_tokenizer

EasyDict = pytest.importorskip("easydict").EasyDict

D, STEP, SEQ_LEN = 32, 1234, 64
SRC_DIR = Path(ratlm.__file__).resolve().parents[1]


def rat_cell(heads=4, chunk=4, groups=2) -> dict:
    return dict(
        _name_="rat",
        d_model=D,
        num_head=heads,
        d_head=D // heads,
        chunk_size=chunk,
        ngroups=groups,
        bias=False,
        init=dict(_name_="fixed", initializer_range=0.02),
    )


def attn_cell(heads=2) -> dict:
    return dict(_name_="attention", d_model=D, num_head=heads, d_head=D // heads, bias=False)


def swa_cell(heads=4, window=3) -> dict:
    return dict(
        _name_="local_attention",
        d_model=D,
        num_head=heads,
        d_head=D // heads,
        window_size=window,
        ln="rmsnorm",
        bias=False,
    )


def rnn_cell() -> dict:
    return dict(_name_="rnn", d_model=D, seq_len=SEQ_LEN, bias=False)


# case -> (our config of the source model, reference backbone fields, reference pe name)
CASES = {
    "rat": (
        dict(layers="rat", n_layers=2, n_heads=4, chunk_size=4, n_groups=2),
        dict(_name_="sequence", seq_cell=rat_cell()),
        "interrope",
    ),
    "attn": (
        dict(layers="attn", n_layers=2, n_heads=2),
        dict(_name_="sequence", seq_cell=attn_cell()),
        "rope",
    ),
    "rnn": (
        dict(layers="rnn", n_layers=2, n_heads=1, position="nope"),
        dict(_name_="sequence", seq_cell=rnn_cell()),
        "empty",
    ),
    "hybrid": (
        dict(layers="rat,swa", n_layers=4, n_heads=4, chunk_size=4, n_groups=2, window=3),
        dict(_name_="sequence_interleave", interleave_step=2, seq_cell=swa_cell(), seq_cell1=rat_cell()),
        "rope_interrope",
    ),
    "nope": (
        dict(layers="rat", n_layers=2, n_heads=4, chunk_size=4, n_groups=1, position="nope"),
        dict(_name_="sequence", seq_cell=rat_cell(groups=1)),
        "empty",
    ),
}


def source_model(case: str, vocab: int) -> LanguageModel:
    config = ModelConfig(vocab_size=vocab, d_model=D, d_ffn=2 * D, context=SEQ_LEN, **CASES[case][0])
    model = LanguageModel(config)
    with torch.no_grad():  # norm weights of 1 would hide a swap between the three kinds of norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def to_reference_names(state: dict) -> dict:
    """Our names -> the reference's (SPEC §3), with torch.compile's `_orig_mod.` in some of them."""
    out = {
        "_orig_mod.embedding.wte.weight": state["embed.weight"],
        "backbone.ln.weight": state["norm.weight"],
    }
    for key, value in state.items():
        if key.startswith("blocks."):
            _, i, part, rest = key.split(".", 3)
            if part == "mixer":
                name = f"seq_layer.{'input_norm.weight' if rest == 'norm.weight' else rest}"
            else:
                name = f"hidden_layer.{'ln.weight' if rest == 'norm.weight' else rest}"
            compiled = "_orig_mod." if int(i) % 2 else ""
            out[f"backbone.{compiled}layers.{i}.{name}"] = value
    out["head.lm_head.weight"] = state["embed.weight"]  # the reference ties the head to the embedding
    return out


def run_config(case: str, vocab: int) -> EasyDict:
    ours, backbone, pe = CASES[case]
    head_dim = D // ours["n_heads"]
    return EasyDict(
        base_dir="/scratch/sequence_model",
        wandb_use=False,
        wandb=dict(entity="someone", project="sequence_model", job_type="fineweb_pretrain", mode="online"),
        data=dict(
            _name_="fineweb_edu",
            seq_len=SEQ_LEN,
            batch_size=4,
            global_batch_size=8,
            train=dict(_name_="lm", path="/scratch/train.bin"),
        ),
        model=dict(
            backbone=dict(
                num_layers=ours["n_layers"],
                d_model=D,
                dropout=0.0,
                bias=False,
                ln="rmsnorm",
                init=dict(_name_="fixed", initializer_range=0.02),
                hidden_cell=dict(_name_="ffn", d_model=D, bias=False),
                **backbone,
            ),
            embedding=dict(
                _name_="lm",
                vocab_size=vocab,
                d_model=D,
                pe=dict(
                    _name_=pe,
                    dim=head_dim,
                    base=10000,
                    max_seq_len=SEQ_LEN,
                    chunk_size=ours.get("chunk_size"),
                ),
            ),
            head=dict(_name_="lm"),
        ),
        task=dict(_name_="lm", ignore_index=-100, metric=dict(_name_="ppl")),
        optim=dict(
            optimizer=dict(_name_="adamw", lr=8e-4, weight_decay=0.1, betas=[0.9, 0.95]),
            lr_scheduler=dict(_name_="cosine", warmup_iter=0.05, eta_min=1e-6, T_max=100),
        ),
        trainer=dict(max_epoch=1, seed=1005, dtype="bfloat16", torch_compile=True, pretrained_path=None),
    )


def write_reference(tmp_path: Path, case: str = "rat", vocab: int = 50, mutate=None, **save_kwargs):
    """A checkpoint as the reference trainer saves it, and the model whose weights it holds."""
    model = source_model(case, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, vocab, (1, 8))).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    ckpt = {
        "task": to_reference_names(model.state_dict()),
        "config": run_config(case, vocab),
        "step": STEP,
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "resume_kwargs": {"resume_step": STEP},
    }
    if mutate is not None:
        mutate(ckpt)
    path = tmp_path / f"{STEP}.pth"
    torch.save(ckpt, path, **save_kwargs)
    return path, model


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_gives_the_same_logits(tmp_path, case):
    src, model = write_reference(tmp_path, case)
    report = convert_official(src, tmp_path / "out")
    loaded = ratlm.from_pretrained(tmp_path / "out")
    assert dataclasses.replace(loaded.config, extra={}) == model.config
    assert loaded.config.extra == {
        "converted_from": "CLAIRE-Labo/RAT checkpoint",
        "source_file": src.name,
        "step": STEP,
    }
    ids = torch.randint(0, 50, (2, 13))  # 13: not a multiple of the chunk size, longer than the window
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-6)
    assert f"step {STEP}" in report and f"parameters: {model.num_params():,}" in report
    assert "skipped entries: optimizer, lr_scheduler, resume_kwargs" in report
    assert "float32 -> float32" in report


def test_report_describes_the_hybrid(tmp_path):
    src, _ = write_reference(tmp_path, "hybrid")
    report = convert_official(src, tmp_path / "out")
    assert "layers 0, 2: RAT, chunk 4, 2 q/k groups, 4 heads of 8" in report
    assert "layers 1, 3: sliding-window attention, window 3" in report


def test_missing_fields_are_read_from_the_weights(tmp_path):
    def drop(ckpt):
        model = ckpt["config"]["model"]
        for section, key in [
            ("embedding", "vocab_size"),
            ("backbone", "d_model"),
            ("backbone", "num_layers"),
        ]:
            model[section].pop(key)
        for key in ("ngroups", "num_head", "d_model"):
            model["backbone"]["seq_cell"].pop(key)

    src, model = write_reference(tmp_path, "rat", mutate=drop)
    convert_official(src, tmp_path / "out")
    assert dataclasses.replace(ratlm.from_pretrained(tmp_path / "out").config, extra={}) == model.config


@pytest.mark.parametrize("named_globals", [True, False], ids=["module-name-pair", "torch-2.5-fallback"])
def test_load_official_gives_plain_dicts(tmp_path, monkeypatch, named_globals):
    if named_globals and not convert._NAMED_GLOBALS:
        pytest.skip("torch < 2.6 takes no (class, 'module.Name') pairs in safe_globals")
    monkeypatch.setattr(convert, "_NAMED_GLOBALS", named_globals)
    src, model = write_reference(tmp_path, "hybrid")
    state, cfg = load_official(src)
    assert not any("_orig_mod" in k for k in state) and len(state) == len(model.state_dict()) + 1
    assert type(cfg) is dict and type(cfg["model"]["backbone"]["seq_cell1"]) is dict
    assert cfg["optim"]["optimizer"]["betas"] == [0.9, 0.95]
    assert config_from_official(cfg, state) == model.config


def test_legacy_torch_save_format_loads(tmp_path):
    src, model = write_reference(tmp_path, "attn", _use_new_zipfile_serialization=False)
    convert_official(src, tmp_path / "out")
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            ratlm.from_pretrained(tmp_path / "out")(ids), model(ids), rtol=0, atol=1e-6
        )


def test_loads_without_the_easydict_package(tmp_path):
    src, _ = write_reference(tmp_path, "rat")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["easydict"] = None  # any `import easydict` now raises ImportError
        from ratlm.convert import load_official
        state, cfg = load_official({str(src)!r})
        assert type(cfg["model"]["backbone"]["seq_cell"]) is dict
        print("loaded", len(state))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded 17" in done.stdout  # 2 layers x 7 tensors + embedding, final norm, head


class RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "config"])
def test_pickled_code_is_refused_and_not_run(tmp_path, where):
    marker = tmp_path / "pwned"

    def inject(ckpt):
        if where == "top":
            ckpt["extra"] = RunsShell(marker)
        else:
            ckpt["config"]["trainer"]["callback"] = RunsShell(marker)

    src, _ = write_reference(tmp_path, "rat", mutate=inject)
    with pytest.raises(CheckpointError, match=r"refused to load the pickled global \S*system"):
        convert_official(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_other_globals_are_refused(tmp_path):
    src, _ = write_reference(tmp_path, "rat", mutate=lambda c: c["config"].update(save_dir=Path("/scratch")))
    with pytest.raises(CheckpointError, match=r"refused to load the pickled global pathlib"):
        load_official(src)


def _set(path: str, value):
    """A mutation that sets ckpt[k1][k2]... = value (or deletes it when value is None)."""

    def mutate(ckpt):
        *parents, last = path.split("/")
        node = ckpt
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last)  # EasyDict.pop also drops the attribute mirror; `del` would not
        else:
            node[last] = value(node) if callable(value) else value

    return mutate


BACKBONE = "config/model/backbone"
BAD_CHECKPOINTS = {
    "no task": (_set("task", None), r"no 'task' state dict"),
    "no config": (_set("config", None), r"no 'config' entry"),
    "wrong shape": (
        _set("task/backbone.layers.0.seq_layer.out_proj.weight", torch.zeros(D, D + 2)),
        r"shape mismatch blocks\.0\.mixer\.out_proj\.weight",
    ),
    "untied head": (
        _set("task/head.lm_head.weight", lambda t: t["head.lm_head.weight"] + 1),
        r"not tied to the embedding",
    ),
    "unknown tensor": (
        _set("task/backbone.layers.0.seq_layer.in_proj.bias", torch.zeros(4)),
        r"unknown tensors .*in_proj\.bias",
    ),
    "unknown mixer": (
        _set(f"{BACKBONE}/seq_cell/_name_", "mamba"),
        r"seq_cell\._name_ is 'mamba'; allowed: rat, attention, local_attention, rnn",
    ),
    "unknown backbone": (
        _set(f"{BACKBONE}/_name_", "sequence_moe"),
        r"allowed: sequence, sequence_interleave",
    ),
    "unknown pe": (_set("config/model/embedding/pe/_name_", "alibi"), r"allowed: rope, interrope"),
    "rope on rat": (_set("config/model/embedding/pe/_name_", "rope"), r"no chunk-index RoPE"),
    "heads disagree": (_set(f"{BACKBONE}/seq_cell/d_head", 16), r"num_head 4 x d_head 16 != d_model 32"),
    "no heads": (
        lambda c: [c["config"]["model"]["backbone"]["seq_cell"].pop(k) for k in ("num_head", "d_head")],
        r"neither num_head nor d_head",
    ),
    "no chunk size": (_set(f"{BACKBONE}/seq_cell/chunk_size", None), r"seq_cell\.chunk_size is missing"),
    "vocab disagrees": (
        _set("config/model/embedding/vocab_size", 60),
        r"vocab_size is 60 but the weights say 50",
    ),
    "groups disagree": (_set(f"{BACKBONE}/seq_cell/ngroups", 4), r"ngroups is 4 but .* implies 2"),
    "layers disagree": (_set(f"{BACKBONE}/num_layers", 3), r"num_layers is 3 but the weights say 2"),
    "layer norm": (_set(f"{BACKBONE}/ln", "layernorm"), r"only ln 'rmsnorm'"),
}


@pytest.mark.parametrize("problem", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_rejected(tmp_path, problem):
    mutate, message = BAD_CHECKPOINTS[problem]
    src, _ = write_reference(tmp_path, "rat", mutate=mutate)
    with pytest.raises(CheckpointError, match=message):
        convert_official(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_reference_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_official(tmp_path / "missing.pth", tmp_path / "out")
    with pytest.raises(CheckpointError, match="is not a file"):
        convert_official(tmp_path, tmp_path / "out")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        convert_official(text, tmp_path / "out")
    tensors = tmp_path / "model.safetensors"
    save_file({"embed.weight": torch.zeros(4, 4)}, str(tensors))
    with pytest.raises(CheckpointError, match="is a safetensors file"):
        convert_official(tensors, tmp_path / "out")
    plain = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], plain)
    with pytest.raises(CheckpointError, match="holds a list"):
        convert_official(plain, tmp_path / "out")


def test_dtype_and_tokenizer(tmp_path):
    src, _ = write_reference(tmp_path, "attn", vocab=260)
    report = convert_official(src, tmp_path / "out", tokenizer="byte", dtype="bf16")
    loaded = ratlm.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert load_tokenizer(tmp_path / "out").vocab_size == 257
    assert "float32 -> bfloat16" in report and "tokenizer: " in report
    with pytest.raises(CheckpointError, match="dtype 'int8' is not supported"):
        convert_official(src, tmp_path / "other", dtype="int8")


def test_tokenizer_larger_than_the_vocabulary_is_rejected(tmp_path):
    src, _ = write_reference(tmp_path, "rat", vocab=50)
    with pytest.raises(CheckpointError, match="has 257 tokens but the model only 50"):
        convert_official(src, tmp_path / "out", tokenizer="byte")
    with pytest.raises(CheckpointError, match="tokenizer"):
        convert_official(src, tmp_path / "out", tokenizer=str(tmp_path / "missing.model"))


def test_config_alone_needs_the_fields_the_weights_would_give(tmp_path):
    cfg = convert._plain(run_config("rat", 50))
    with pytest.raises(CheckpointError, match="hidden_cell hidden width is missing"):
        config_from_official(cfg)
    del cfg["model"]["backbone"]["seq_cell"]["ngroups"]
    cfg["model"]["backbone"]["hidden_cell"]["d_ffn"] = 64
    with pytest.raises(CheckpointError, match="ngroups of the RAT layers is missing"):
        config_from_official(cfg)


def test_interleaved_layers_must_share_their_head_count(tmp_path):
    def two_heads(ckpt):
        ckpt["config"]["model"]["backbone"]["seq_cell"].update(num_head=2, d_head=16)

    src, _ = write_reference(tmp_path, "hybrid", mutate=two_heads)
    with pytest.raises(CheckpointError, match=r"seq_cell sets n_heads 2, another layer 4; ratlm needs one"):
        convert_official(src, tmp_path / "out")
