"""Token streams from text, JSONL, `ratlm tokenize` folders, .bin and .npy, with EOS after every document."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ratlm.evaluation.inputs import EvalDataError, load_tokens
from ratlm.tokenizer import ByteTokenizer

from .conftest import DOCS

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def expected_stream(docs: list[str]) -> list[int]:
    return [t for d in docs for t in [*d.encode(), EOS]]


def test_text_and_jsonl_get_eos_after_every_document(tmp_path, jsonl_file):
    (tmp_path / "one.txt").write_text("line one\nline two\n")
    stream = load_tokens([tmp_path / "one.txt", jsonl_file], BYTE)
    assert stream.tokens.tolist() == expected_stream(["line one\nline two\n", *DOCS])
    assert stream.eos_id == EOS


def test_tokenize_folder_manifest_and_raw_token_files(tmp_path):
    tokens = np.asarray(expected_stream(DOCS), dtype=np.uint16)
    folder = tmp_path / "shards"
    folder.mkdir()
    tokens[:50].tofile(folder / "tokens_00000.bin")
    tokens[50:].tofile(folder / "tokens_00001.bin")
    shards = [
        {"file": "tokens_00000.bin", "tokens": 50},
        {"file": "tokens_00001.bin", "tokens": len(tokens) - 50},
    ]
    manifest = {"format": "ratlm-tokens", "dtype": "uint16", "eos_id": EOS, "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for source in (folder, folder / "manifest.json"):
        stream = load_tokens([source])  # no tokenizer needed: the manifest names the EOS id
        assert stream.tokens.tolist() == tokens.tolist() and stream.eos_id == EOS
    assert load_tokens([folder / "tokens_00001.bin"]).tokens.tolist() == tokens[50:].tolist()

    tokens.astype(np.uint32).tofile(tmp_path / "flat.bin")
    np.save(tmp_path / "flat.npy", tokens.astype(np.int32))
    wide = load_tokens([tmp_path / "flat.bin"], BYTE, token_dtype="uint32")
    assert wide.tokens.tolist() == tokens.tolist() and wide.eos_id == EOS  # EOS from the tokenizer
    assert load_tokens([tmp_path / "flat.npy"]).eos_id is None  # no tokenizer, no manifest: unknown
    capped = load_tokens([tmp_path / "flat.npy", folder], max_tokens=len(tokens) + 7)
    assert capped.tokens.tolist() == tokens.tolist() + tokens[:7].tolist()


def test_ratlm_tokenize_output_reads_like_the_text(tmp_path, jsonl_file):
    shards = pytest.importorskip("ratlm.shards")
    shards.tokenize([jsonl_file], tmp_path / "tok", tokenizer="byte", progress=False)
    assert load_tokens([tmp_path / "tok"]).tokens.tolist() == load_tokens([jsonl_file], BYTE).tokens.tolist()


def test_unusable_inputs(tmp_path, jsonl_file):
    with pytest.raises(EvalDataError, match="no tokenizer"):
        load_tokens([jsonl_file], None)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(EvalDataError, match="unknown data format"):
        load_tokens([tmp_path / "data.csv"], BYTE)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(EvalDataError, match="whole number"):
        load_tokens([tmp_path / "odd.bin"])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:1"):
        load_tokens([tmp_path / "bad.jsonl"], BYTE)
    with pytest.raises(FileNotFoundError):
        load_tokens([tmp_path / "missing.txt"], BYTE)
