"""``study.jsonl``: one JSON object per grid cell, appended (and flushed) when the cell is done.

A row's ``key`` is the hash of the cell's resolved config; a row's ``cell`` is its effect and
label. Reading skips a half-written last line (a study killed while writing), so the cell is run
again, as a cell with no row is.
"""

from __future__ import annotations

import json
from pathlib import Path

STUDY_JSONL = "study.jsonl"
STUDY_PNG = "study.png"
RESULT_NAME = "result.json"  # in a cell's run folder, written last
RANDOM_INIT_DIR = "foundations/random-init"  # under the study folder: the randomly initialised model


class StudyStore:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / STUDY_JSONL

    def rows(self) -> list[dict]:
        """Every complete row, in order (a line that is not a JSON object is skipped)."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row and "cell" in row:
                rows.append(row)
        return rows

    def append(self, row: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.is_file() else ""
        with open(self.path, "a", encoding="utf-8") as f:
            if text and not text.endswith("\n"):  # a half-written line before: end it, it stays skipped
                f.write("\n")
            f.write(json.dumps(row) + "\n")
            f.flush()
