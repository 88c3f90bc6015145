"""Every default of the pipeline, in one place (other configs start from `get_config()`).

Sections: data, tokenizer, teacher, pretrain, eval, mesh (later stages add theirs).
Runs nothing by itself; the configs built on it do, e.g.

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Stages run in this order by taylorcal_jax.main (names are keys of main.STAGES).
    c.stages = ("pretrain", "eval_teacher")
    c.progress = True  # tqdm bars

    # Text source: "stdlib" | "files:<glob>[,<glob>]" | "hf:<name>[:<config>]".
    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"
    c.data.include_tests = True  # stdlib: keep test/ dirs (about 31 MB of .py in all)
    c.data.max_documents = 0  # 0 = all; else the first N documents by id (before splitting)
    c.data.valid_fraction = 0.02
    c.data.test_fraction = 0.02
    c.data.split_seed = 0

    # "" = train a byte-level BPE on the train split (saved in <workdir>/data/tokenizer),
    # unless teacher.path is set, then the teacher's own tokenizer is used.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""
    c.tokenizer.vocab_size = 4096
    c.tokenizer.min_frequency = 2

    # teacher.path: an HF checkpoint dir (skips pretraining). Otherwise the architecture
    # below is pretrained into <workdir>/teacher.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""
    c.teacher.model_type = "llama"
    c.teacher.hidden_size = 256
    c.teacher.intermediate_size = 768
    c.teacher.num_hidden_layers = 4
    c.teacher.num_attention_heads = 4
    c.teacher.num_key_value_heads = 2
    c.teacher.head_dim = 64
    c.teacher.max_position_embeddings = 1024
    c.teacher.rope_theta = 10000.0
    c.teacher.rms_norm_eps = 1e-5
    c.teacher.tie_word_embeddings = True
    c.teacher.vocab_multiple = 64  # model vocab = len(tokenizer) rounded up to this
    c.teacher.dtype = "float32"  # compute dtype ("float32" | "bfloat16"); params stay fp32

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 2000
    c.pretrain.batch_size = 32
    c.pretrain.seq_len = 256
    c.pretrain.learning_rate = 2e-3
    c.pretrain.warmup_steps = 100
    c.pretrain.min_lr_ratio = 0.1
    c.pretrain.weight_decay = 0.1
    c.pretrain.b1 = 0.9
    c.pretrain.b2 = 0.95
    c.pretrain.grad_clip = 1.0
    c.pretrain.checkpoint_every = 200
    c.pretrain.eval_every = 500  # 0 = only at the end
    c.pretrain.eval_sequences = 32  # valid sequences for the in-training eval
    c.pretrain.log_every = 20
    c.pretrain.seed = 0

    # Teacher evaluation (and the default evaluation set of later stages).
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "valid"
    c.eval.num_sequences = 128
    c.eval.seq_len = 256
    c.eval.batch_size = 16
    c.eval.seed = 0

    # Device mesh. distributed=True calls jax.distributed.initialize() (multi-host).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.distributed = False
    c.mesh.shape = (-1,)  # -1: all remaining devices
    c.mesh.axes = ("data",)
    return c
