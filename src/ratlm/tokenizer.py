"""Tokenizers behind one small interface, so data, training and sampling code never care which is used.

Three kinds are supported: raw UTF-8 bytes (no files, no dependencies; handy for the embedded
corpus and tests), SentencePiece ``.model`` files (what the released RAT checkpoints use) and
Hugging Face ``tokenizers`` ``tokenizer.json`` files. ``encode`` never adds BOS/EOS: the data
pipeline appends EOS per document itself, matching how the released models were trained.
Nothing here touches the network; every tokenizer is loaded from a local file.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

CONFIG_FILE = "tokenizer_config.json"
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
ACCEPTED = (
    f"'byte', a SentencePiece .model file, a tokenizers .json file, "
    f"or a directory holding {CONFIG_FILE}, {SPM_FILE} or {HF_FILE}"
)


class Tokenizer(ABC):
    """Text <-> token ids. ``eos_id``/``bos_id`` are ``None`` when the vocabulary has no such token."""

    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``, without BOS or EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; special tokens such as EOS are dropped."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode several texts; subclasses override this when their library batches faster."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write what ``load_tokenizer(directory)`` needs, so a checkpoint folder is self-contained."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and checkpoint metadata."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOS = 256: any text encodes, and nothing needs training."""

    vocab_size = 257
    eos_id = 256
    bos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Sampled ids can split a multi-byte character, so undecodable bytes become U+FFFD.
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"type": "byte"}) + "\n", encoding="utf-8")

    def describe(self) -> str:
        return f"byte-level UTF-8 (vocab {self.vocab_size}, eos {self.eos_id})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; EOS and BOS ids come from the model (-1 there means none)."""

    def __init__(self, path: str | Path) -> None:
        spm = _require("sentencepiece")
        self.path = _existing_file(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = _optional_id(self._sp.eos_id())
        self.bos_id = _optional_id(self._sp.bos_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPM_FILE).write_bytes(self._sp.serialized_model_proto())

    def describe(self) -> str:
        return (
            f"sentencepiece {self.path.name} (vocab {self.vocab_size}, eos {self.eos_id}, bos {self.bos_id})"
        )


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file; EOS/BOS are looked up among its special tokens by name."""

    EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>")
    BOS_NAMES = ("<s>", "<|startoftext|>", "<bos>")

    def __init__(self, path: str | Path) -> None:
        tokenizers = _require("tokenizers")
        self.path = _existing_file(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.eos_id = next((special[n] for n in self.EOS_NAMES if n in special), None)
        self.bos_id = next((special[n] for n in self.BOS_NAMES if n in special), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_FILE))

    def describe(self) -> str:
        return f"tokenizers {self.path.name} (vocab {self.vocab_size}, eos {self.eos_id}, bos {self.bos_id})"


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Build a tokenizer from ``spec``: ``"byte"``, a ``.model`` or ``.json`` file, or a saved directory."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} not found; expected {ACCEPTED}")
    if path.name == CONFIG_FILE:
        return _load_directory(path.parent)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(f"tokenizer {str(spec)!r} is not a recognised tokenizer file; expected {ACCEPTED}")


def _load_directory(directory: Path) -> Tokenizer:
    """Prefer an explicit byte config, then SentencePiece, then tokenizers (a model folder may hold both)."""
    config = directory / CONFIG_FILE
    if config.is_file():
        kind = json.loads(config.read_text(encoding="utf-8")).get("type")
        if kind == "byte":
            return ByteTokenizer()
    if (directory / SPM_FILE).is_file():
        return SentencePieceTokenizer(directory / SPM_FILE)
    if (directory / HF_FILE).is_file():
        return HFTokenizer(directory / HF_FILE)
    raise FileNotFoundError(f"tokenizer directory {str(directory)!r} holds no tokenizer; expected {ACCEPTED}")


def _require(module: str) -> ModuleType:
    """Import an optional dependency (each has a ratlm extra of its own name), saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this tokenizer needs the {module!r} package: pip install {module} "
            f"(or pip install 'ratlm[{module}]')"
        ) from err


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
    return path


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id
