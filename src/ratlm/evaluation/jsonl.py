"""JSON lines, read with their line numbers (for errors that say where) and written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def read_jsonl(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `error` names a line that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: not a JSON object")
            yield number, record


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, written atomically (a crash leaves no half file that a re-run would keep)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def is_string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
