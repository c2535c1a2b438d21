"""What an evaluation reads: a model directory, its tokenizer, and token streams.

A token stream is one flat array of token ids in which every document is followed by EOS (SPEC §3).
It is read from any mix of, concatenated in the order given:
- `.txt`: the whole file is one document; `.jsonl`: one document per line, its text in `text_field`;
  both are encoded with the model's tokenizer (no BOS) and EOS is appended to each document;
- a folder written by `ratlm tokenize` (a manifest.json naming the dtype, the EOS id and the flat
  shard files), or that manifest.json itself;
- `.bin`: a flat little-endian token array, uint16 unless a manifest.json beside it or `token_dtype`
  says otherwise; `.npy`: a 1-D integer array. These already hold their EOS tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer, load_tokenizer

TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".jsonl")


class EvalDataError(ValueError):
    """Evaluation data that cannot be read or does not fit the model."""


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D token ids; every document is followed by eos_id
    eos_id: int | None  # None: no document boundaries are known, every target is scored
    name: str


def resolve_device(name: str | None) -> torch.device:
    """None or "auto" picks CUDA when present; an explicit CUDA device must exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use cpu")
    return device


def load_model(directory: str | Path, device: str | None = None, dtype: str | None = None):
    """A model directory (from `save_pretrained` or `ratlm convert-official`) in eval mode, on `device`."""
    from ..checkpoint import dtype_named, from_pretrained, note_fp32_on_cuda

    model = from_pretrained(directory, device=resolve_device(device), dtype=dtype_named(dtype))
    note_fp32_on_cuda(model, dtype is not None)
    return model


def model_tokenizer(model_dir: str | Path, tokenizer: str | None = None) -> Tokenizer | None:
    """The tokenizer given, else the one saved in the model directory, else None."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(model_dir)
    except FileNotFoundError:
        return None


def load_tokens(
    paths: list[str | Path],
    tokenizer: Tokenizer | None = None,
    token_dtype: str = "uint16",
    text_field: str = "text",
    max_tokens: int | None = None,
) -> TokenStream:
    """One token stream from the inputs, in order; with max_tokens, only its first max_tokens tokens
    (token files are memory-mapped, so only those are read)."""
    if token_dtype not in TOKEN_DTYPES:
        raise EvalDataError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    if not paths:
        raise EvalDataError("no evaluation data given")
    taken, eos_ids, left = [], set(), max_tokens
    for item in paths:
        path = Path(item).expanduser()
        if path.suffix in TEXT_SUFFIXES:
            parts, eos = _encode_text(path, tokenizer, text_field)
        else:
            parts, eos = _read_token_file(path, token_dtype)
            eos = eos if eos is not None else getattr(tokenizer, "eos_id", None)
        eos_ids.add(eos)
        for part in parts:
            if left is not None:
                part, left = part[:left], left - min(left, len(part))
            taken.append(np.asarray(part, dtype=np.int64))
        if left == 0:
            break
    known = eos_ids - {None}  # an input that names no EOS id takes the others'
    if len(known) > 1:
        raise EvalDataError(f"the inputs disagree on the EOS token id: {sorted(known)}")
    tokens = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
    if len(tokens) == 0:
        raise EvalDataError("the evaluation data holds no tokens")
    eos = known.pop() if known else None
    return TokenStream(tokens=tokens, eos_id=eos, name=", ".join(str(p) for p in paths))


def _encode_text(path: Path, tokenizer: Tokenizer | None, field: str) -> tuple[list[np.ndarray], int | None]:
    if tokenizer is None:
        raise EvalDataError(
            f"{path} is text, but no tokenizer was found: save one with the model or pass --tokenizer"
        )
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} not found")
    text = path.read_text(encoding="utf-8")
    docs = [text] if path.suffix == ".txt" else _jsonl_documents(text, path, field)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    ids = [t for doc in tokenizer.encode_batch(docs) for t in doc + eos]
    return [np.asarray(ids, dtype=np.int64)], tokenizer.eos_id


def _jsonl_documents(text: str, path: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise EvalDataError(f"{path}:{number}: no text field {field!r}")
        docs.append(record[field])
    return docs


def _read_token_file(path: Path, token_dtype: str) -> tuple[list[np.ndarray], int | None]:
    if path.is_dir() or path.name == MANIFEST:
        return _read_manifest(path if path.is_dir() else path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} not found")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise EvalDataError(f"{path} must hold a 1-D integer array, not {tokens.dtype} {tokens.shape}")
        return [tokens], None
    if path.suffix == ".bin":
        beside = path.parent / MANIFEST
        manifest = json.loads(beside.read_text()) if beside.is_file() else {}
        return [_map(path, np.dtype(manifest.get("dtype", token_dtype)))], manifest.get("eos_id")
    raise EvalDataError(
        f"{path}: unknown data format; expected .txt, .jsonl, .bin, .npy, or a `ratlm tokenize` folder"
    )


def _read_manifest(directory: Path) -> tuple[list[np.ndarray], int | None]:
    path = directory / MANIFEST
    if not path.is_file():
        raise EvalDataError(f"{directory} has no {MANIFEST}: not a `ratlm tokenize` folder")
    try:
        manifest = json.loads(path.read_text())
        dtype = np.dtype(manifest["dtype"])
        files = [directory / shard["file"] for shard in manifest["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalDataError(f"{path} is not a token manifest (dtype, shards[].file): {e}") from e
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EvalDataError(f"shards listed in {path} are missing: {missing[:3]}")
    return [_map(f, dtype) for f in files], manifest.get("eos_id")


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """A flat little-endian token file, memory-mapped (an empty one as an empty array)."""
    dtype = dtype.newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise EvalDataError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
