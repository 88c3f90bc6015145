"""Where each stage's student lives in the workdir, and which one a later stage reads.

    select_layers   <workdir>/student                  the calibrated student (zero-shot)
    distill_layers  <workdir>/student_distill_layers   after distillation stage 1
    distill         <workdir>/student_distilled        after distillation stage 2

Each is a student directory (models/student.py `save_student`, plus the tokenizer's files).
A stage that reads a student reads the one of the last of these stages listed before it in
`config.stages`, and `select_layers`'s when neither distillation stage is: `distill` goes on
from stage 1's student when both are listed, and `eval_student` evaluates the latest.
"""

from __future__ import annotations

STUDENT_DIRS = {
    "select_layers": "student",
    "distill_layers": "student_distill_layers",
    "distill": "student_distilled",
}


def source_stage(config, reader: str) -> str:
    """The stage whose student stage `reader` reads (module docstring)."""
    listed = list(config.stages)
    before = listed[: listed.index(reader)] if reader in listed else listed
    for stage in reversed(before):
        if stage in STUDENT_DIRS:
            return stage
    return "select_layers"


def student_dir(config, reader: str) -> str:
    """Workdir-relative directory of the student stage `reader` reads."""
    return STUDENT_DIRS[source_stage(config, reader)]
