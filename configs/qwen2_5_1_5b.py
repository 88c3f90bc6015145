"""Taylor-Calibrate on Qwen2.5-1.5B from a local checkpoint: 28 layers, 12 heads (2 kv), head
dim 128: uniform 25% keeps 0, 4, ..., 24 (7 of 28), as in the release.

    python -m taylorcal_jax.main --config=configs/qwen2_5_1_5b.py:/path/to/Qwen2.5-1.5B \
        --workdir=/tmp/taylorcal_qwen2_5_1_5b
    python launch/sweep_zero_shot.py --config=configs/qwen2_5_1_5b.py:/path/to/Qwen2.5-1.5B \
        --workdir=/tmp/taylorcal_qwen2_5_1_5b --teacher_name=qwen2_5_1_5b

Without an arg the checkpoint is read from checkpoints/Qwen2.5-1.5B. See configs/real_teacher.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    return real_teacher.real_teacher_config("checkpoints/Qwen2.5-1.5B", arg)
