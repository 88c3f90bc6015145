"""A tiny pretraining problem that tests build: `tiny_pretraining(config, cycles, **options)`."""

from __future__ import annotations

import jax
import numpy as np

from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.train import pretrain as pretrain_lib

# AdamW on a cosine schedule with warm-up, a checkpoint every few steps, every step logged.
TINY_PRETRAIN_DEFAULTS = dict(
    steps=8,
    batch_size=4,
    seq_len=12,
    learning_rate=1e-2,
    warmup_steps=2,
    min_lr_ratio=0.1,
    weight_decay=0.01,
    b1=0.9,
    b2=0.95,
    grad_clip=1.0,
    checkpoint_every=3,
    eval_every=0,
    log_every=1,
    seed=0,
)


def tiny_pretraining(config, cycles: int, **options):
    """(model, params, stream, PretrainOptions): a teacher of `config` (params from PRNGKey(0)),
    a learnable token stream (a fixed random permutation of the vocabulary repeated `cycles`
    times: the next token is a function of this one) and TINY_PRETRAIN_DEFAULTS updated by
    `options`."""
    perm = np.random.default_rng(0).permutation(config.vocab_size)
    stream = np.tile(perm, cycles).astype(np.int32)
    opts = pretrain_lib.PretrainOptions(**{**TINY_PRETRAIN_DEFAULTS, **options})
    return Transformer(config), init_params(config, jax.random.PRNGKey(0)), stream, opts
