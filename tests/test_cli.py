import json

import pytest

from ratlm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_of_a_paper_preset(capsys):
    code, out, _ = run(capsys, "info", "rat-1.3b", "--preset")
    assert code == 0
    assert "1,298,810,880" in out
    assert "bytes/token" in out


def test_unknown_preset_exits_2(capsys):
    code, _, err = run(capsys, "info", "rat-99b", "--preset")
    assert code == 2
    assert "unknown preset" in err and "rat-1.3b" in err


def test_chunk_size_below_one_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--chunk-size", "0"])
    assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_widths_that_do_not_divide_exit_2(capsys, tmp_path):
    code, _, err = run(
        capsys, "train", "--preset", "rat-tiny", "--d-model", "65", "--out", str(tmp_path / "m")
    )
    assert code == 2
    assert "divisible" in err


def test_missing_and_malformed_model_directories_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "bad"), "--prompt", "hi")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"d_model": 64, "n_heads": 2, "bogus": 1}))
    code, _, err = run(capsys, "info", str(tmp_path / "bad"))
    assert code == 2 and "bogus" in err


def test_train_then_generate_from_the_cli(capsys, tmp_path):
    out = str(tmp_path / "model")
    train = "train --preset rat-tiny --max-steps 3 --batch-size 2 --seq-len 32 --eval-every 0"
    train += " --final-eval-tokens 5000 --sample-tokens 5 --device cpu"
    code, text, _ = run(capsys, *train.split(), "--out", out)
    assert code == 0 and "validation loss" in text
    prompts = ["--prompt", "ROMEO.", "--prompt", "JULIET.\n"]
    options = ["--max-new-tokens", "8", "--greedy", "--device", "cpu"]
    code, text, _ = run(capsys, "generate", "--model", out, *prompts, *options)
    assert code == 0
    assert "ROMEO." in text and "JULIET." in text
    code, text, _ = run(capsys, "info", out)
    assert code == 0 and "parameters" in text


def test_generate_with_a_tokenizer_too_large_for_the_model_exits_2(capsys, tmp_path):
    import torch

    from ratlm import LanguageModel, preset

    model = LanguageModel(preset("rat-tiny", vocab_size=100))
    model.save_pretrained(tmp_path / "m")
    code, _, err = run(
        capsys, "generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--tokenizer", "byte"
    )
    assert code == 2 and "tokenizer" in err
    assert torch.is_tensor(model.embed.weight)
