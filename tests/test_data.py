import gzip
import hashlib
import json

import numpy as np
import pytest

from ratlm.cli import main
from ratlm.loader import IGNORE_INDEX, TokenSource, WindowLoader, permute, to_batch
from ratlm.shards import DataError, load_manifest, tokenize, verify_shards
from ratlm.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id


def stream(directory) -> np.ndarray:
    """All shards of a tokenized folder, concatenated."""
    m = load_manifest(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype=m["dtype"]) for s in m["shards"]])


def expected(*docs: str) -> list[int]:
    return [t for d in docs for t in [*d.encode(), EOS]]


def test_txt_jsonl_gz_and_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "second", "id": 1}) + "\n\n" + json.dumps({"text": "third é"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "", "fifth"]}), tmp_path / "c.parquet")
    out = tmp_path / "tok"
    m = tokenize([tmp_path / "a.txt", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet"], out, shard_tokens=16)
    docs = ["first document\nwith two lines\n", "second", "third é", "fourth", "fifth"]
    assert stream(out).tolist() == expected(*docs)  # no BOS, one EOS after every (non-empty) document
    assert m["tokens"] == len(expected(*docs)) and m["documents"] == 5 and m["dtype"] == "uint16"
    assert m["eos_id"] == EOS and "byte-level" in m["tokenizer"]
    assert [s["documents"] for s in m["sources"]] == [1, 2, 2]
    assert len(m["shards"]) == -(-m["tokens"] // 16) and all(s["tokens"] == 16 for s in m["shards"][:-1])
    for s in m["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    verify_shards(out)
    # the loader reads across shard boundaries as one stream
    source = TokenSource.from_directory(out)
    assert source.read(10, 40).tolist() == expected(*docs)[10:40]
    with open(out / m["shards"][1]["file"], "r+b") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="checksum"):
        verify_shards(out)


def test_long_text_files_are_streamed_in_pieces_and_lines_can_be_documents(tmp_path, monkeypatch):
    import ratlm.shards

    monkeypatch.setattr(ratlm.shards, "PIECE_CHARS", 10)
    monkeypatch.setattr(ratlm.shards, "BATCH_CHARS", 25)
    text = "".join(f"line {i}\n" for i in range(40))
    (tmp_path / "big.txt").write_text(text)
    tokenize([tmp_path / "big.txt"], tmp_path / "whole")
    assert stream(tmp_path / "whole").tolist() == expected(text)  # one document, one EOS
    tokenize([tmp_path / "big.txt"], tmp_path / "lines", doc_per="line")
    assert stream(tmp_path / "lines").tolist() == expected(*[f"line {i}" for i in range(40)])


def test_folders_are_searched_and_workers_give_the_same_shards(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("bravo")
    (tmp_path / "in" / "sub" / "a.jsonl").write_text('{"content": "alpha"}\n')
    (tmp_path / "in" / "notes.csv").write_text("skipped")
    (tmp_path / "in" / ".hidden.txt").write_text("skipped")
    (tmp_path / "in" / "b.txt").write_text("bravo " * 1000)
    one = tokenize([tmp_path / "in"], tmp_path / "one", text_field="content")
    two = tokenize([tmp_path / "in"], tmp_path / "two", text_field="content", workers=2)
    assert stream(tmp_path / "one").tolist() == expected("bravo " * 1000, "alpha")
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def test_a_vocabulary_over_65536_gives_uint32_shards(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w1 w69999 w5")
    m = tokenize([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tmp_path / "tokenizer.json")
    assert m["dtype"] == "uint32"
    assert stream(tmp_path / "out").tolist() == [1, 69_999, 5, 70_001]


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        tokenize([tmp_path / "empty.txt"], tmp_path / "o1")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        tokenize([tmp_path / "data.xlsx"], tmp_path / "o2")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        tokenize([tmp_path / "bad.jsonl"], tmp_path / "o3")
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        tokenize([tmp_path / "field.jsonl"], tmp_path / "o4")
    with pytest.raises(DataError, match="does not exist"):
        tokenize([tmp_path / "missing.txt"], tmp_path / "o5")
    (tmp_path / "ok.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not found"):
        tokenize([tmp_path / "ok.txt"], tmp_path / "o6", tokenizer=tmp_path / "nope.model")
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()  # nothing half-written is left behind
    tokenize([tmp_path / "ok.txt"], tmp_path / "o7")
    with pytest.raises(DataError, match="--overwrite"):
        tokenize([tmp_path / "ok.txt"], tmp_path / "o7")
    with pytest.raises(DataError, match="not a tokenized data folder"):
        TokenSource.from_directory(tmp_path)


def test_tokenize_cli_and_an_error_exit(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text")
    assert main(["tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t")]) == 0
    assert "10 tokens in 1 documents" in capsys.readouterr().out
    assert main(["tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_permutation_is_a_bijection_and_depends_on_the_key():
    for n in (1, 2, 7, 1000, 4097):
        assert sorted(permute(np.arange(n), n, key=3).tolist()) == list(range(n))
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


def loader(n_tokens=1000, seq_len=10, **kw) -> WindowLoader:
    return WindowLoader(TokenSource.from_array(np.arange(n_tokens) % 50, eos_id=49), seq_len, **kw)


def test_windows_overlap_by_one_token_and_each_epoch_covers_all():
    ld = loader(seed=5)
    assert ld.n_windows == 99
    w = ld.windows(np.array([0, 3]))
    assert w.shape == (2, 11) and w[0].tolist() == list(range(11)) and w[1, 0] == 30
    epoch0, epoch1 = ld.window_ids(0, 99), ld.window_ids(99, 99)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(99))
    assert epoch0.tolist() != epoch1.tolist()  # reshuffled every epoch
    assert loader(shuffle=False).window_ids(97, 4).tolist() == [97, 98, 0, 1]


def test_ranks_split_the_global_batch_and_resume_needs_only_the_state():
    single = loader(seed=1)
    whole = [single.next_step(8, 4) for _ in range(3)]
    parts = []
    for rank in range(2):
        ld = loader(seed=1)
        parts.append([ld.next_step(8, 2, rank=rank, world=2) for _ in range(3)])
    for step in range(3):
        joined = np.concatenate([*parts[0][step], *parts[1][step]])
        assert np.array_equal(joined, np.concatenate(whole[step]))
    resumed = loader(seed=1)
    resumed.load_state_dict(json.loads(json.dumps(single.state_dict())))
    fresh = loader(seed=1)
    for _ in range(3):
        fresh.next_step(8, 8)
    assert np.array_equal(resumed.next_step(8, 8)[0], fresh.next_step(8, 8)[0])
    with pytest.raises(DataError, match="seq_len"):
        loader(seq_len=20, seed=1).load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match="does not split"):
        single.next_step(6, 4, rank=0, world=2)


def test_target_after_eos_is_ignored_and_short_data_is_refused():
    x, y = to_batch(np.array([[1, 49, 2, 3]]), 49, "cpu")
    assert x.tolist() == [[1, 49, 2]] and y.tolist() == [[49, IGNORE_INDEX, 3]]
    with pytest.raises(DataError, match="longer than the data"):
        loader(n_tokens=10, seq_len=10)
