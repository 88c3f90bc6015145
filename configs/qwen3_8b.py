"""Taylor-Calibrate on Qwen3-8B from a local checkpoint: 36 layers, 32 heads (8 kv), head dim
128, q/k RMSNorm (dropped in GDN layers): uniform 25% keeps 0, 4, ..., 32.

    python -m taylorcal_jax.main --config=configs/qwen3_8b.py:/path/to/Qwen3-8B \
        --workdir=/tmp/taylorcal_qwen3_8b
    python launch/sweep_zero_shot.py --config=configs/qwen3_8b.py:/path/to/Qwen3-8B \
        --workdir=/tmp/taylorcal_qwen3_8b --teacher_name=qwen3_8b

Without an arg the checkpoint is read from checkpoints/Qwen3-8B. See configs/real_teacher.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    return real_teacher.real_teacher_config("checkpoints/Qwen3-8B", arg)
