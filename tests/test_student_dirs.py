"""Which student a stage reads: that of the last student-writing stage listed before it."""

import types

import pytest

from taylorcal_jax.train import student_dirs


@pytest.mark.parametrize(
    "stages,reader,expected",
    [
        (("select_layers", "distill_layers", "distill", "eval_student"), "eval_student", "distill"),
        (
            ("select_layers", "distill", "distill_layers", "eval_student"),
            "eval_student",
            "distill_layers",
        ),  # fmt: skip
        (("select_layers", "distill_layers", "distill"), "distill", "distill_layers"),
        (("select_layers", "distill", "eval_student"), "distill", "select_layers"),
        (("eval_student",), "eval_student", "select_layers"),
    ],
)
def test_the_last_student_listed_before_the_reader(stages, reader, expected):
    config = types.SimpleNamespace(stages=stages)
    assert student_dirs.source_stage(config, reader) == expected
    assert student_dirs.student_dir(config, reader) == student_dirs.STUDENT_DIRS[expected]
