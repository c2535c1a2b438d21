import json
import os
import stat

import pytest
import torch

from ratlm import LanguageModel, from_pretrained, preset
from ratlm.checkpoint import CheckpointError, atomic_directory
from ratlm.tokenizer import ByteTokenizer, load_tokenizer


def test_round_trip_keeps_weights_config_and_tokenizer(tmp_path):
    model = LanguageModel(preset("rat-tiny", layers="rat,swa,rnn,attn", window=5))
    model.save_pretrained(tmp_path / "m")
    ByteTokenizer().save(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    ids = torch.randint(0, 257, (2, 19))
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert loaded.embed.weight.data_ptr() != 0 and not loaded.training
    assert isinstance(load_tokenizer(tmp_path / "m"), ByteTokenizer)


def test_saved_directory_is_as_readable_as_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        LanguageModel(preset("rat-tiny")).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_failed_write_leaves_the_previous_directory_untouched(tmp_path):
    model = LanguageModel(preset("rat-tiny"))
    model.save_pretrained(tmp_path / "m")
    before = {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()}

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_directory(tmp_path / "m", crash)
    assert {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_missing_or_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "none")
    model = LanguageModel(preset("rat-tiny"))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_ffn"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(tmp_path / "m")


def test_inference_loaders_note_fp32_weights_on_cuda(recwarn):
    from types import SimpleNamespace

    from ratlm.checkpoint import note_fp32_on_cuda

    def model(is_cuda, dtype):
        return SimpleNamespace(embed=SimpleNamespace(weight=SimpleNamespace(is_cuda=is_cuda, dtype=dtype)))

    note_fp32_on_cuda(model(False, torch.float32), dtype_given=False)  # the CPU: fp32 is the fast path
    note_fp32_on_cuda(model(True, torch.bfloat16), dtype_given=False)
    note_fp32_on_cuda(model(True, torch.float32), dtype_given=True)  # asked for
    assert not recwarn.list
    with pytest.warns(UserWarning, match="--dtype bf16"):
        note_fp32_on_cuda(model(True, torch.float32), dtype_given=False)
