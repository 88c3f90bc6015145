"""Taylor-Calibrate on Qwen2.5-3B-Instruct from a local checkpoint: 36 layers, 16 heads (2 kv),
head dim 128: uniform 25% keeps 0, 4, ..., 32 (9 of 36); the release's zero-shot table
(docs/method.md §8) is on this teacher.

    python -m taylorcal_jax.main --config=configs/qwen2_5_3b.py:/path/to/Qwen2.5-3B-Instruct \
        --workdir=/tmp/taylorcal_qwen2_5_3b
    python launch/sweep_zero_shot.py --config=configs/qwen2_5_3b.py:/path/to/Qwen2.5-3B-Instruct \
        --workdir=/tmp/taylorcal_qwen2_5_3b --teacher_name=qwen2_5_3b

Without an arg the checkpoint is read from checkpoints/Qwen2.5-3B-Instruct. See
configs/real_teacher.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    return real_teacher.real_teacher_config("checkpoints/Qwen2.5-3B-Instruct", arg)
