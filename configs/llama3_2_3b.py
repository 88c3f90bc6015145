"""Taylor-Calibrate on Llama-3.2-3B from a local checkpoint: 28 layers, 24 heads (8 kv), head
dim 128, llama3 RoPE scaling: uniform 25% keeps 0, 4, ..., 24.

    python -m taylorcal_jax.main --config=configs/llama3_2_3b.py:/path/to/Llama-3.2-3B \
        --workdir=/tmp/taylorcal_llama3_2_3b
    python launch/sweep_zero_shot.py --config=configs/llama3_2_3b.py:/path/to/Llama-3.2-3B \
        --workdir=/tmp/taylorcal_llama3_2_3b --teacher_name=llama3_2_3b

Without an arg the checkpoint is read from checkpoints/Llama-3.2-3B. See configs/real_teacher.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    return real_teacher.real_teacher_config("checkpoints/Llama-3.2-3B", arg)
