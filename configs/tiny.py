"""A small teacher of our own, pretrained on the Python standard library (2 CPU cores).

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny

`:smoke` shrinks everything (a few seconds of training) for tests and dry runs:

    python -m taylorcal_jax.main --config=configs/tiny.py:smoke --workdir=/tmp/taylorcal_smoke
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg: str | None = None):
    c = common.get_config()
    # The whole pipeline: teacher -> statistics -> calibration -> alignment -> layer selection
    # -> distillation (stages 1 and 2, briefly) -> evaluation.
    c.stages = (
        "pretrain",
        "eval_teacher",
        "statistics",
        "calibrate",
        "align",
        "select_layers",
        "distill_layers",
        "distill",
        "eval_student",
    )
    c.tokenizer.vocab_size = 2048
    c.teacher.hidden_size = 128
    c.teacher.intermediate_size = 384
    c.teacher.num_hidden_layers = 4
    c.teacher.num_attention_heads = 4
    c.teacher.num_key_value_heads = 2
    c.teacher.head_dim = 32
    c.teacher.max_position_embeddings = 512
    # 600 steps of 16 x 128 tokens at a peak lr of 6e-3: valid ppl 38 after 172 s of training on
    # 2 idle cores, where 32-sequence batches at 3e-3 reached 62 in the same tokens and time
    # (launch/results/tiny_pretrain_settings_cpu.md).
    c.pretrain.steps = 600
    c.pretrain.batch_size = 16
    c.pretrain.seq_len = 128
    c.pretrain.learning_rate = 6e-3
    c.pretrain.warmup_steps = 50
    c.pretrain.checkpoint_every = 100
    c.pretrain.eval_every = 200
    c.pretrain.eval_sequences = 32
    c.eval.num_sequences = 128
    c.eval.seq_len = 128
    c.eval.batch_size = 32
    # Distillation, briefly: 40 steps of 16 x 128 tokens per stage, float32 on a CPU.
    for stage in (c.distill.layers, c.distill.kl):
        stage.batch_size = 16
        stage.seq_len = 128
        stage.train_tokens = 40 * 16 * 128
        stage.eval_every_tokens = 20 * 16 * 128
        stage.checkpoint_every_tokens = 20 * 16 * 128
        stage.dtype = "float32"
        stage.remat = False
    c.distill.layers.warmup_fraction = 0.05
    c.distill.kl.chunk_size = 64
    if arg == "smoke":
        common.apply_smoke(c)
    elif arg:
        raise ValueError(
            f"unknown config arg {arg!r}; use configs/tiny.py or configs/tiny.py:smoke"
        )
    return c
