"""``gaisnet study``: the GaisNet case study (issue 10) as one resumable command.

``grid``: every effect and cell with its overrides, in one place; ``cell``: one cell as a whole
run of the in-process runtime (``InProcessGaisNet``: the same core code as the Ray runtime, called
directly; the Ray runtime gives the same knowledge, which tests check elsewhere) in its own run
folder; ``store``: ``study.jsonl``; ``plot``: ``study.png``; ``runner``: the loop, resumable by the
hash of each cell's resolved config. No torch at import: the CLI refuses bad input before it loads.
"""

from __future__ import annotations

from .grid import EFFECTS, STUDY_BASE, Cell, default_grid, select
from .runner import StudyError, list_study, run_study

__all__ = ["EFFECTS", "STUDY_BASE", "Cell", "StudyError", "default_grid", "list_study", "run_study", "select"]
