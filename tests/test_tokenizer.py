"""Every tokenizer kind must round-trip text and survive save/load, since checkpoints carry them."""

import json
import sys
from pathlib import Path

import pytest

from ratlm.corpus import load_works
from ratlm.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

LINE = "The handle toward my hand? Come, let me clutch thee."


@pytest.fixture(scope="module")
def sample_text() -> str:
    """A few KB of real text: enough to train tiny vocabularies in well under a second."""
    works = {w.id: w for w in load_works()}
    return works["hamlet"].text[:6000] + "\n" + works["sonnets"].text[:2000]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    (root / "train.txt").write_text(sample_text, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "train.txt"),
        model_prefix=str(root / "tiny"),
        vocab_size=100,
        character_coverage=1.0,
        minloglevel=2,
    )
    return root / "tiny.model"


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_text.split("\n"), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tiny.json"
    tok.save(str(path))
    return path


def assert_same(a: Tokenizer, b: Tokenizer, text: str) -> None:
    assert type(a) is type(b)
    assert (a.vocab_size, a.eos_id, a.bos_id) == (b.vocab_size, b.eos_id, b.bos_id)
    assert a.encode(text) == b.encode(text)


def test_byte_round_trip_unicode() -> None:
    tok = ByteTokenizer()
    text = "Héllo, wörld — ∑ 日本語 🎭\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, ""]) == [ids, []]
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (257, 256, None)
    assert "byte" in tok.describe()


def test_byte_eos_and_broken_utf8() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ab") + [tok.eos_id] + tok.encode("cd")
    assert tok.decode(ids) == "abcd"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_byte_save_load(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"type": "byte"}
    assert_same(ByteTokenizer(), load_tokenizer(tmp_path), LINE)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer_config.json"), ByteTokenizer)


def test_sentencepiece(spm_path: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(spm_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (100, 2, 1)
    ids = tok.encode(LINE)
    assert tok.decode(ids) == LINE
    assert tok.eos_id not in ids and tok.bos_id not in ids  # encode adds no specials
    assert tok.decode(ids + [tok.eos_id]) == LINE
    assert tok.encode_batch([LINE, "thee"]) == [ids, tok.encode("thee")]

    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    assert_same(tok, load_tokenizer(tmp_path), LINE)
    assert_same(tok, load_tokenizer(tmp_path / "tokenizer.model"), LINE)


def test_hf_tokenizers(hf_path: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 0 and tok.bos_id is None
    text = LINE + "\nHéllo 🎭"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.encode_batch([text, LINE]) == [ids, tok.encode(LINE)]

    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert_same(tok, load_tokenizer(tmp_path), text)


def test_directory_preference(spm_path: Path, hf_path: Path, tmp_path: Path) -> None:
    """A model folder with a foreign tokenizer_config.json and both files loads SentencePiece."""
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    load_tokenizer(hf_path).save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    load_tokenizer(spm_path).save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


@pytest.mark.parametrize("spec", ["bytes", "no/such/tokenizer.model", "missing_dir/"])
def test_missing_specs(spec: str) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(spec)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)  # empty directory
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(other)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        SentencePieceTokenizer(tmp_path / "absent.model")


@pytest.mark.parametrize("module", ["sentencepiece", "tokenizers"])
def test_missing_library_says_how_to_install(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    cls = SentencePieceTokenizer if module == "sentencepiece" else HFTokenizer
    with pytest.raises(ImportError, match=rf"pip install 'ratlm\[{module}\]'"):
        cls("whatever")
