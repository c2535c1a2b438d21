"""Token shards: `ratlm tokenize` turns text into flat token files and a manifest (SPEC §3 convention).

Every document is encoded without BOS and followed by EOS; the concatenated stream is cut into shards
of `shard_tokens` tokens (a document may span two shards, the loader treats all shards as one stream).
Shards are raw little-endian uint16 arrays when the vocabulary fits (the released models' format),
uint32 otherwise. The output folder holds:

    manifest.json       token and document counts, dtype, tokenizer, sources, per-shard sha256
    tokens_00000.bin    ...
    tokenizer files     what `load_tokenizer(folder)` needs, so training finds the tokenizer itself

Inputs are read as streams (never whole): `.txt` (the whole file is one document, or one per line
with doc_per="line"), `.jsonl` (one JSON object per line, text in `text_field`), `.parquet` (column
`text_field`, needs pyarrow); `.gz`, `.xz` and `.bz2` compression is undone on the fly.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import atomic_directory
from .tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "ratlm-tokens"
SHARD_PATTERN = "tokens_{:05d}.bin"
FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
PIECE_CHARS = 1 << 20  # a whole-file txt document is encoded in pieces of about this many characters
BATCH_CHARS = 4 << 20  # characters handed to the tokenizer (or a worker) at once


class DataError(ValueError):
    """Unusable training data: unknown format, nothing to read, malformed records or shards."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def source_format(path: Path) -> str | None:
    """'txt', 'jsonl', 'parquet' or None, from the suffix (after an optional compression suffix)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in OPENERS:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    return None if fmt == "parquet" and path.suffix.lower() in OPENERS else fmt


def find_sources(inputs: Iterable[str | Path]) -> list[Path]:
    """Input files in order: files as given, folders searched recursively (sorted, hidden files and
    files of other formats skipped). A named file of unknown format is an error."""
    found = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            inside = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            usable = [p for p in inside if source_format(p)]
            if not usable:
                raise DataError(
                    f"folder {path} holds no .txt, .jsonl or .parquet files (optionally .gz/.xz/.bz2)"
                )
            found += usable
        elif path.is_file():
            if source_format(path) is None:
                raise DataError(
                    f"{path}: unknown format; expected .txt, .jsonl or .parquet (optionally .gz, .xz or .bz2)"
                )
            found.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not found:
        raise DataError("no input files given")
    return found


def read_documents(
    path: Path, text_field: str = "text", doc_per: str = "file"
) -> Iterator[tuple[str, bool, int]]:
    """Yield (text, ends_document, bytes of the file read so far) for one source file."""
    fmt = source_format(path)
    if fmt == "parquet":
        yield from _read_parquet(path, text_field)
        return
    with open(path, "rb") as raw:
        opener = OPENERS.get(path.suffix.lower())
        stream = opener(raw) if opener else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
        if fmt == "jsonl":
            yield from _read_jsonl(text, raw, path, text_field)
        elif doc_per == "line":
            for line in text:
                if line.strip():
                    yield line.rstrip("\r\n"), True, raw.tell()
        else:
            # One document per file, read in pieces cut at line ends so a huge file never sits in memory.
            pieces, size, seen = [], 0, False
            for line in text:
                pieces.append(line)
                size += len(line)
                if size >= PIECE_CHARS:
                    yield "".join(pieces), False, raw.tell()
                    pieces, size, seen = [], 0, True
            if seen or pieces:
                yield "".join(pieces), True, raw.tell()


def _read_jsonl(text: io.TextIOBase, raw, path: Path, field: str) -> Iterator[tuple[str, bool, int]]:
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{number}: no {field!r} field (choose another with --text-field)")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {field!r} is {type(value).__name__}, not text")
        if value:
            yield value, True, raw.tell()


def _read_parquet(path: Path, field: str) -> Iterator[tuple[str, bool, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from e
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if field not in file.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {file.schema_arrow.names})")
    rows, size, done = max(file.metadata.num_rows, 1), path.stat().st_size, 0
    for batch in file.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            done += 1
            if value:
                yield value, True, size * done // rows


def _batches(items: Iterator[tuple[str, bool, int]]) -> Iterator[tuple[list[str], list[bool], int]]:
    """Group (text, ends_document) items into batches of about BATCH_CHARS characters."""
    texts, ends, size, pos = [], [], 0, 0
    for text, end, pos in items:
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= BATCH_CHARS:
            yield texts, ends, pos
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends, pos


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode(texts: list[str], ends: list[bool], tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    eos = [tokenizer.eos_id]
    ids = tokenizer.encode_batch(texts)
    flat = [t for piece, end in zip(ids, ends, strict=True) for t in (piece + eos if end else piece)]
    return np.asarray(flat, dtype=dtype)


def _encode_in_worker(job: tuple[list[str], list[bool], str]) -> np.ndarray:
    texts, ends, dtype = job
    return _encode(texts, ends, _worker_tokenizer, np.dtype(dtype))


class ShardWriter:
    """Appends tokens to fixed-size shard files, hashing them on the way."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self._count == self.shard_tokens:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._count)
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            tokens = tokens[take:]

    def _open(self) -> None:
        self._close()
        name = SHARD_PATTERN.format(len(self.shards))
        # The file stays open across write() calls; _close() closes it.
        self._file = open(self.directory / name, "wb")  # noqa: SIM115
        self._hash, self._count = hashlib.sha256(), 0
        self.shards.append({"file": name})

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
            self._file = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def tokenize(
    inputs: Iterable[str | Path],
    out: str | Path,
    tokenizer: str | Path = "byte",
    text_field: str = "text",
    doc_per: str = "file",
    shard_tokens: int = 1 << 28,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize the inputs into shards under `out` (written atomically); returns the manifest."""
    if doc_per not in ("file", "line"):
        raise DataError(f"doc_per must be 'file' or 'line', got {doc_per!r}")
    if shard_tokens < 1 or workers < 1:
        raise DataError("shard_tokens and workers must be >= 1")
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"{out} already holds tokenized data; pass --overwrite to replace it")
    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tok.describe()} has no EOS token, which ends every document (SPEC §3)")
    sources = find_sources(inputs)
    dtype = token_dtype(tok.vocab_size)
    manifest: dict = {}

    def write(tmp: Path) -> None:
        writer = ShardWriter(tmp, dtype, shard_tokens)
        pool = None
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer),))
        total = sum(p.stat().st_size for p in sources)
        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress, dynamic_ncols=True
        )
        stats, start, n_tokens = [], time.perf_counter(), 0
        try:
            for path in sources:
                counts = {
                    "path": str(path.resolve()),
                    "bytes": path.stat().st_size,
                    "documents": 0,
                    "tokens": 0,
                }
                done = 0  # bytes of this file the progress bar has counted
                batches = _batches(read_documents(path, text_field, doc_per))
                for tokens, ends, pos in _encoded(batches, pool, workers, tok, dtype):
                    writer.write(tokens)
                    counts["documents"] += sum(ends)
                    counts["tokens"] += len(tokens)
                    bar.update(pos - done)
                    done = pos
                    bar.set_postfix(tokens=f"{n_tokens + counts['tokens']:,}")
                bar.update(counts["bytes"] - done)
                if counts["tokens"] == 0:
                    tqdm.write(f"warning: {path} holds no text; skipped", file=sys.stderr)
                n_tokens += counts["tokens"]
                stats.append(counts)
        finally:
            bar.close()
            if pool:
                pool.terminate()
        shards = writer.close()
        if n_tokens == 0:
            raise DataError("the inputs hold no text: " + ", ".join(str(p) for p in sources[:5]))
        tok.save(tmp)
        manifest.update(
            format=FORMAT,
            version=1,
            dtype=dtype.name,
            tokens=n_tokens,
            documents=sum(s["documents"] for s in stats),
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            tokenizer=tok.describe(),
            convention="no BOS; EOS appended to every document; the target right after an EOS is ignored",
            text_field=text_field,
            doc_per=doc_per,
            seconds=round(time.perf_counter() - start, 1),
            sources=stats,
            shards=shards,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    atomic_directory(out, write)
    return manifest


def _encoded(
    batches, pool, workers: int, tok: Tokenizer, dtype: np.dtype
) -> Iterator[tuple[np.ndarray, list[bool], int]]:
    """(tokens, ends_document flags, file position) per batch, in input order, encoded here or by the pool.

    At most two batches per worker are in flight, so memory stays bounded whatever the input size
    (Pool.imap would read the whole input ahead).
    """
    if pool is None:
        for texts, ends, pos in batches:
            yield _encode(texts, ends, tok, dtype), ends, pos
        return
    pending: deque = deque()
    for texts, ends, pos in batches:
        pending.append((pool.apply_async(_encode_in_worker, ((texts, ends, dtype.str),)), ends, pos))
        if len(pending) >= 2 * workers:
            result, ends_, pos_ = pending.popleft()
            yield result.get(), ends_, pos_
    while pending:
        result, ends_, pos_ = pending.popleft()
        yield result.get(), ends_, pos_


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise DataError(f"data folder {directory} does not exist")
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}: not a tokenized data folder (see `ratlm tokenize`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    return manifest


def verify_shards(directory: str | Path) -> None:
    """Recompute every shard's sha256 and compare it with the manifest (reads all the data)."""
    manifest = load_manifest(directory)
    for shard in manifest["shards"]:
        digest = hashlib.sha256()
        with open(Path(directory) / shard["file"], "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            raise DataError(
                f"{shard['file']} in {directory} does not match its checksum: the file is damaged"
            )


def shard_paths(directory: str | Path, manifest: dict) -> list[tuple[Path, int]]:
    """(path, tokens) of each shard, checking that the files exist and have the recorded sizes."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    out = []
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing")
        if os.path.getsize(path) != shard["tokens"] * itemsize:
            raise DataError(
                f"shard {path} has {os.path.getsize(path)} bytes, expected {shard['tokens'] * itemsize}"
            )
        out.append((path, shard["tokens"]))
    return out
