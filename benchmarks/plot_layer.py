"""Redraw the layer benchmark figure from committed JSON lines: the full grid, plus optional later runs.

    python benchmarks/plot_layer.py OUT.png FULL.jsonl [LABEL=LATER.jsonl ...]

Rows of a later run are drawn as open squares labelled LABEL, beside the full grid's lines.
"""

import json
import sys
from pathlib import Path

from ratlm.bench.layer import plot_rows


def read(path: str, series: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{**r, "series": series} if series else r for r in rows]


def main(argv: list[str]) -> None:
    out, full, *later = argv
    rows = read(full)
    for item in later:
        label, path = item.split("=", 1)
        rows += read(path, label)
    tokens = next((r["settings"]["tokens"] for r in rows if r.get("kind") == "env"), 262144)
    plot_rows(rows, ["train", "prefill"], tokens, Path(out))


if __name__ == "__main__":
    main(sys.argv[1:])
