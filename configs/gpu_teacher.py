"""A larger teacher for one H100 (~29M parameters, a few minutes), on the Python stdlib.

    python -m taylorcal_jax.main --config=configs/gpu_teacher.py --workdir=/tmp/taylorcal_gpu

300 steps x 64 x 512 tokens = 9.8M tokens (about one pass over the stdlib train split at
vocab 8192), bf16 compute with fp32 params. (1000 steps, about 4 passes, memorised the
train split on an H100: train loss 0.55, valid ppl 2e4 against a unigram 935.)
`:smoke` is a dry run of the same code path with everything shrunk (a CPU, seconds):

    python -m taylorcal_jax.main --config=configs/gpu_teacher.py:smoke --workdir=/tmp/gpu_smoke
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg: str | None = None):
    c = common.get_config()
    c.tokenizer.vocab_size = 8192
    # 5% of the stdlib files for validation (~0.1M tokens at this vocab): room for the
    # 96 x 512 evaluation set (2% left only ~44k tokens on Python 3.12's stdlib).
    c.data.valid_fraction = 0.05
    c.teacher.hidden_size = 512
    c.teacher.intermediate_size = 1536
    c.teacher.num_hidden_layers = 8
    c.teacher.num_attention_heads = 8
    c.teacher.num_key_value_heads = 4
    c.teacher.head_dim = 64
    c.teacher.max_position_embeddings = 2048
    c.teacher.dtype = "bfloat16"
    c.pretrain.steps = 300
    c.pretrain.batch_size = 64
    c.pretrain.seq_len = 512
    c.pretrain.learning_rate = 1.5e-3
    c.pretrain.warmup_steps = 30
    c.pretrain.checkpoint_every = 100
    c.pretrain.eval_every = 100
    c.pretrain.eval_sequences = 64
    c.pretrain.log_every = 50
    c.eval.num_sequences = 96
    c.eval.seq_len = 512
    c.eval.batch_size = 32
    if arg == "smoke":
        common.apply_smoke(c)
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use configs/gpu_teacher.py[:smoke]")
    return c
