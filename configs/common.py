"""Every default of the pipeline, in one place (other configs start from `get_config()`).

Sections: data, tokenizer, teacher, pretrain, eval, mesh, calibration, select (later stages
add theirs).
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
    c.data.max_documents = 0  # 0 = all; else the first N kept documents by id (before splitting)
    # Files larger than this are skipped with a warning (they are usually generated data, not
    # prose or code; a run should not stop for one of them). The largest .py in the stdlib
    # is 0.76 MB, in a site-packages with torch, jax and transformers 3.98 MB; tokenising a
    # document holds ~200 bytes per character at once, so 4 MiB keeps that under 1 GB.
    c.data.max_file_bytes = 4 << 20
    # Bytes that are not UTF-8 become U+FFFD (counted, with a warning); above this fraction of
    # the kept bytes the run stops: the corpus is in another encoding, e.g. latin-1. The
    # stdlib's deliberately non-UTF-8 test files are 2e-6 of it.
    c.data.max_undecodable_fraction = 1e-4
    # A BPE trained here (no tokenizer.path, no teacher) learns from at most this many bytes of
    # the train split, a fixed pseudo-random sample of its documents (0 = all of it): its time
    # grows with the text (site-packages .py on 2 busy cores: 100 MB took 108 s and 420 MB,
    # a 32 MiB sample of it 35 s and 370 MB).
    c.data.bpe_sample_bytes = 32 << 20
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

    # Taylor-Calibrate (taylorcal_jax/calibrate, METHOD.md §4-5): stages statistics, calibrate,
    # align. Strategies: copy, zero_gate, small_gate, taylor_init, align_only, taylor_calibrate.
    c.calibration = ml_collections.ConfigDict()
    c.calibration.strategy = "taylor_calibrate"
    c.calibration.split = "train"  # calibration text (the release used 4 x 256 of wikitext test)
    c.calibration.num_sequences = 4
    c.calibration.seq_len = 256
    c.calibration.seed = 0
    c.calibration.block_size = 128  # key/query block of the O(T)-memory statistics
    c.calibration.sequences_per_batch = 4  # teacher passes vmapped together
    c.calibration.teacher_pass = "blockwise"  # O(T) memory; "model": dense Transformer pass
    c.calibration.init_seed = 0  # random parts of the `copy` init (shared by all strategies)
    c.calibration.gamma_min = 1e-3  # decay gamma = clip(ln2 / D_h, gamma_min, gamma_max)
    c.calibration.gamma_max = 5.0
    c.calibration.beta_min = 0.3  # write gate beta_h = beta_min + beta_span * concentration_h
    c.calibration.beta_span = 0.4
    c.calibration.entropy_span_floor = 1e-3
    c.calibration.write_gate = "release"  # "release" (published) | "mean_direction" (ours)
    c.calibration.a_proj_scale = 0.0  # Wa *= this (0: x Wa = 0, exact half-life D_h)
    c.calibration.sigma_min = 0.1  # value scale clip
    c.calibration.sigma_max = 10.0
    c.calibration.gate_damping = 0.01  # Wg = alpha Wv, alpha = damping rms(C) / rms(silu(x Wv))
    # Phase-1 parts written into the params (the rest keep the `copy` init); all four = the
    # published method. Subsets are ablations (launch/sweep_zero_shot.py --phase1_ablation).
    c.calibration.phase1_parts = ("decay", "write_gate", "value_scale", "output_gate")
    c.calibration.align = ml_collections.ConfigDict()
    c.calibration.align.steps = 300
    c.calibration.align.lr_qkv = 1e-4
    c.calibration.align.lr_gates = 1e-3
    c.calibration.align.weight_decay = 0.01
    c.calibration.align.clip_norm = 1.0
    c.calibration.mesh_layers = -1  # alignment mesh: layers axis (-1: all remaining devices)
    c.calibration.mesh_data = 1  # and data axis (splits the calibration sequences)
    c.calibration.gdn = ml_collections.ConfigDict()  # student GDN mixer options
    c.calibration.gdn.use_short_conv = False
    c.calibration.gdn.conv_size = 4
    c.calibration.gdn.norm_eps = 1e-5
    c.calibration.gdn.impl = "auto"
    c.calibration.gdn.chunk_size = 64
    # what the Pallas GPU kernel keeps for its backward: "auto" (bf16: T, h, v', the fastest),
    # "t" (T only: less memory per GDN layer, reruns the state pass) or "inputs"
    c.calibration.gdn.pallas_residuals = "auto"

    # Layers that keep softmax attention (METHOD.md §7), stage select_layers.
    c.select = ml_collections.ConfigDict()
    c.select.policy = "uniform"  # "uniform" | "ar" | "ga_s2"
    c.select.kept_fraction = 0.25
    c.select.keep_layers = ()  # explicit keep_full_attention_layers; overrides the policy
    c.select.split = "train"  # text the ar / ga_s2 candidates are scored on
    c.select.num_sequences = 16
    c.select.seq_len = 256
    c.select.seed = 1
    c.select.batch_size = 4
    c.select.parallel_candidates = 4  # candidate students vmapped together
    return c


def apply_smoke(c):
    """Shrinks a config so a whole run takes seconds (tiny corpus, model and step count)."""
    c.data.max_documents = 40
    c.data.valid_fraction = 0.2
    c.data.test_fraction = 0.1
    c.tokenizer.vocab_size = 320
    c.teacher.hidden_size = 32
    c.teacher.intermediate_size = 64
    c.teacher.num_hidden_layers = 2
    c.teacher.num_attention_heads = 2
    c.teacher.num_key_value_heads = 1
    c.teacher.head_dim = 16
    c.teacher.max_position_embeddings = 64
    c.pretrain.steps = 6
    c.pretrain.batch_size = 4
    c.pretrain.seq_len = 32
    c.pretrain.warmup_steps = 2
    c.pretrain.checkpoint_every = 3
    c.pretrain.eval_every = 3
    c.pretrain.eval_sequences = 4
    c.pretrain.log_every = 2
    c.eval.num_sequences = 6
    c.eval.seq_len = 32
    c.eval.batch_size = 4
    c.progress = False
    return c
