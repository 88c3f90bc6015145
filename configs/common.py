"""Every default of the pipeline, in one place (other configs start from `get_config()`).

Sections: data, tokenizer, teacher, pretrain, eval, mesh, calibration, select, distill.
The comment on (or just above) each assignment in `get_config` is that field's description:
`python -m taylorcal_jax.main --print_config` shows it next to the value.
Runs nothing by itself; the configs built on it do, e.g.

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    # Stages to run, in order (`python -m taylorcal_jax.main --help` lists them).
    c.stages = ("pretrain", "eval_teacher")
    c.progress = True  # progress bars on stderr for long steps

    # The text every stage reads, split by document into train, valid and test.
    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # "stdlib" | "files:<glob>[,<glob>]" | "hf:<name>[:<config>]"
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
    c.data.valid_fraction = 0.02  # share of documents in the valid split (hashed by content)
    c.data.test_fraction = 0.02  # share of documents in the test split (hashed by content)
    c.data.split_seed = 0  # key of the document hash that assigns splits

    # "" = train a byte-level BPE on the train split (saved in <workdir>/data/tokenizer),
    # unless teacher.path is set, then the teacher's own tokenizer is used.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a tokenizer directory (AutoTokenizer); "" = see above
    c.tokenizer.vocab_size = 4096  # size of the trained BPE (at least 259: 256 bytes + 3 specials)
    c.tokenizer.min_frequency = 2  # BPE merges need at least this many occurrences

    # teacher.path: an HF checkpoint dir (skips pretraining). Otherwise the architecture
    # below is pretrained into <workdir>/teacher.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # HF checkpoint directory (config.json + *.safetensors); "" = pretrain
    c.teacher.model_type = "llama"  # architecture family of the pretrained teacher
    c.teacher.hidden_size = 256  # width of the residual stream
    c.teacher.intermediate_size = 768  # width of the SwiGLU MLP
    c.teacher.num_hidden_layers = 4  # Transformer blocks
    c.teacher.num_attention_heads = 4  # query heads
    c.teacher.num_key_value_heads = 2  # key/value heads (grouped-query attention)
    c.teacher.head_dim = 64  # width of one attention head (even, for RoPE)
    c.teacher.max_position_embeddings = 1024  # longest sequence the teacher accepts
    c.teacher.rope_theta = 10000.0  # RoPE base frequency
    c.teacher.rms_norm_eps = 1e-5  # RMSNorm epsilon
    c.teacher.tie_word_embeddings = True  # output head shares the embedding matrix
    c.teacher.vocab_multiple = 64  # model vocab = len(tokenizer) rounded up to this
    c.teacher.dtype = "float32"  # compute dtype ("float32" | "bfloat16"); params stay fp32

    # Pretraining of the teacher above (stage pretrain): next-token loss, AdamW, cosine decay.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 2000  # optimiser steps
    c.pretrain.batch_size = 32  # sequences per step (a multiple of mesh.data x mesh.fsdp)
    c.pretrain.seq_len = 256  # tokens per sequence
    c.pretrain.learning_rate = 2e-3  # peak learning rate
    c.pretrain.warmup_steps = 100  # linear warm-up from 0 to the peak
    c.pretrain.min_lr_ratio = 0.1  # final learning rate / peak (cosine decay)
    c.pretrain.weight_decay = 0.1  # AdamW weight decay (matrices only)
    c.pretrain.b1 = 0.9  # Adam beta1
    c.pretrain.b2 = 0.95  # Adam beta2
    c.pretrain.grad_clip = 1.0  # global gradient-norm clip
    c.pretrain.checkpoint_every = 200  # steps between orbax checkpoints (a rerun resumes)
    c.pretrain.eval_every = 500  # steps between valid-split evaluations (0 = only at the end)
    c.pretrain.eval_sequences = 32  # valid sequences for the in-training evaluation
    c.pretrain.log_every = 20  # steps between loss lines in metrics.jsonl
    c.pretrain.seed = 0  # initial parameters and batch order

    # Teacher evaluation (and the default evaluation set of later stages).
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "valid"  # split the perplexities are measured on
    c.eval.num_sequences = 128  # sequences sampled from that split
    c.eval.seq_len = 256  # tokens per sequence
    c.eval.batch_size = 16  # sequences per forward pass (rounded up to a multiple of the devices)
    c.eval.seed = 0  # which sequences are sampled

    # Device mesh, built once per run. Alignment splits layers over "layers" and calibration
    # sequences over "data"; statistics, evaluation and layer scoring split their batches over
    # every device; pretraining splits batches over "data" and "fsdp" and params (with their
    # optimiser state) over "fsdp"; with fsdp > 1 the teacher's params are stored sharded too.
    c.mesh = ml_collections.ConfigDict()
    # Start jax.distributed first (several hosts, or one process per GPU): the coordinator,
    # process count and id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    # or from the cluster (TPU pod, SLURM, ...); launch/multihost.py sets them.
    c.mesh.distributed = False
    c.mesh.layers = -1  # devices on the "layers" axis (-1: all the other axes leave)
    c.mesh.data = 1  # devices on the "data" axis (-1: all the other axes leave)
    c.mesh.fsdp = 1  # devices each param is split over (FSDP; -1: all the other axes leave)

    # Taylor-Calibrate (taylorcal_jax/calibrate, docs/method.md §4-5): stages statistics, calibrate,
    # align. Strategies: copy, zero_gate, small_gate, taylor_init, align_only, taylor_calibrate,
    # taylor_calibrate_published (phase 1 with all four parts, as published, then phase 2).
    c.calibration = ml_collections.ConfigDict()
    c.calibration.strategy = "taylor_calibrate"  # how converted layers are initialised
    c.calibration.split = "train"  # calibration text (the release used 4 x 256 of wikitext test)
    c.calibration.num_sequences = 4  # calibration sequences (a multiple of mesh.data)
    c.calibration.seq_len = 256  # tokens per calibration sequence
    c.calibration.seed = 0  # which calibration sequences are sampled
    c.calibration.block_size = 128  # key/query block of the O(T)-memory statistics
    c.calibration.sequences_per_batch = 4  # teacher passes vmapped together
    c.calibration.teacher_pass = "blockwise"  # O(T) memory; "model": dense Transformer pass
    c.calibration.init_seed = 0  # random parts of the `copy` init (shared by all strategies)
    c.calibration.gamma_min = 1e-3  # decay gamma = clip(ln2 / D_h, gamma_min, gamma_max)
    c.calibration.gamma_max = 5.0  # upper clip of the decay gamma
    c.calibration.beta_min = 0.3  # write gate beta_h = beta_min + beta_span * concentration_h
    c.calibration.beta_span = 0.4  # range of the write-gate target above beta_min
    c.calibration.entropy_span_floor = 1e-3  # smallest entropy range the write gate divides by
    c.calibration.write_gate = "release"  # "release" (published) | "mean_direction" (ours)
    c.calibration.a_proj_scale = 0.0  # Wa *= this (0: x Wa = 0, exact half-life D_h)
    c.calibration.sigma_min = 0.1  # lower clip of the value scale (phase 1)
    c.calibration.sigma_max = 10.0  # upper clip of the value scale
    c.calibration.gate_damping = 0.01  # Wg = alpha Wv, alpha = damping rms(C) / rms(silu(x Wv))
    # Phase-1 parts taylor_init and taylor_calibrate write into the params (the rest keep the
    # `copy` init), from decay, write_gate, value_scale, output_gate. The published method writes
    # all four (strategy taylor_calibrate_published). On SmolLM2-135M the value scale is what
    # hurts, and the output gate alone beats alignment alone (launch/results/
    # zero_shot_smollm2_135m_phase1_ablation.md; docs/method.md §8).
    c.calibration.phase1_parts = ("output_gate",)
    # Phase 2 (stage align): per-layer AdamW fit of each GDN mixer to the teacher's attention.
    c.calibration.align = ml_collections.ConfigDict()
    c.calibration.align.steps = 300  # optimiser steps per layer (the best step is kept)
    c.calibration.align.lr_qkv = 1e-4  # learning rate of the q/k/v projections
    c.calibration.align.lr_gates = 1e-3  # learning rate of the gates, decay and output gate
    c.calibration.align.weight_decay = 0.01  # AdamW weight decay (every trained leaf)
    c.calibration.align.clip_norm = 1.0  # per-layer global gradient-norm clip
    # steps between orbax checkpoints of the fit (0 = none); an interrupted align resumes
    # from the last one (removed when align finishes). A checkpoint holds every layer's mixer 4
    # times in float32 (params, best params, two AdamW moments), and the last two are kept:
    # 5.3 GB each for Qwen2.5-1.5B (28 layers of 11.8 M GDN parameters).
    c.calibration.align.checkpoint_every = 100
    c.calibration.gdn = ml_collections.ConfigDict()  # student GDN mixer options
    c.calibration.gdn.use_short_conv = False  # causal short convolutions on q, k, v
    c.calibration.gdn.conv_size = 4  # their kernel width
    c.calibration.gdn.norm_eps = 1e-5  # epsilon of the gated output RMSNorm
    c.calibration.gdn.impl = "auto"  # GDN kernel: auto | reference | chunked | pallas
    c.calibration.gdn.chunk_size = 64  # chunk length of the chunked and Pallas kernels
    # what the Pallas GPU kernel keeps for its backward: "states" (T, h and v', the fastest),
    # "t" (T only: less memory per GDN layer, reruns the state pass), "inputs", or "auto" (the
    # operand dtype's default: "states" in bf16, "inputs" in fp32; docs/kernel.md); where the
    # kernel path does not take it (float32 operands keep "inputs" only; TPU refuses "t"),
    # impl "auto" runs the chunked op
    c.calibration.gdn.pallas_residuals = "auto"
    # a cached single-token step (generation, decoding): "xla" | "pallas" (one kernel; Triton on
    # a GPU, interpret mode elsewhere) | "auto" (pallas on a GPU, xla elsewhere)
    c.calibration.gdn.decode_impl = "auto"
    # x Wq, x Wk, x Wv, x Wg as one product (and x Wa, x Wb as another), the same parameters:
    # fewer, wider products; a batch-1 decoding step of the Qwen2.5-1.5B-shaped student took
    # 0.80x the time on one H100, batch 16 1.00x (launch/results/probe_decode_h100_gemv.json)
    c.calibration.gdn.fused_projections = True

    # Layers that keep softmax attention (docs/method.md §7), stage select_layers.
    c.select = ml_collections.ConfigDict()
    c.select.policy = "uniform"  # "uniform" | "ar" | "ga_s2"
    c.select.kept_fraction = 0.25  # share of layers that keep softmax attention (at least 1)
    c.select.keep_layers = ()  # explicit keep_full_attention_layers; overrides the policy
    c.select.split = "train"  # text the ar / ga_s2 candidates are scored on
    c.select.num_sequences = 16  # scoring sequences
    c.select.seq_len = 256  # tokens per scoring sequence
    c.select.seed = 1  # which scoring sequences are sampled
    c.select.batch_size = 4  # sequences per scoring pass (rounded up to a multiple of the devices)
    c.select.parallel_candidates = 4  # candidate students vmapped together

    # Distillation after initialisation (docs/method.md §6): stage distill_layers (stage 1),
    # then stage distill (stage 2). Defaults: the release's recipe at full scale. Token
    # figures are rounded up to whole steps of batch_size x seq_len tokens.
    c.distill = ml_collections.ConfigDict()
    c.distill.split = "train"  # text both stages train on (windows at seeded random offsets)
    c.distill.seed = 0  # batch order: every init sees the same batches in the same order
    c.distill.log_every = 10  # steps between loss lines in metrics.jsonl
    # also write the student at every evaluation (a finished stage is not rerun for it:
    # --rerun=distill_layers,distill)
    c.distill.save_students = False
    # Stage 1: each converted layer's mixer fitted to its teacher layer (teacher-forced),
    # loss mean ||y_teacher - y_student||_2 / sqrt(hidden); AdamW, cosine decay.
    c.distill.layers = ml_collections.ConfigDict()
    c.distill.layers.train_tokens = 100_000_000  # training tokens (release: 100M)
    c.distill.layers.batch_size = 96  # sequences per step (a multiple of mesh.data)
    c.distill.layers.seq_len = 512  # tokens per sequence
    c.distill.layers.learning_rate = 1e-3  # peak learning rate of the mixer parameters
    c.distill.layers.warmup_fraction = 0.01  # share of the steps spent warming up from 0
    c.distill.layers.min_lr_ratio = 0.0  # final learning rate / peak (cosine decay)
    c.distill.layers.weight_decay = 0.0  # AdamW weight decay (matrices only)
    c.distill.layers.clip_norm = 1.0  # global gradient-norm clip
    c.distill.layers.dtype = "bfloat16"  # compute dtype ("float32" | "bfloat16"); params fp32
    c.distill.layers.remat = False  # recompute each mixer in the backward pass (less memory)
    # the teacher's attention: "auto" (cudnn on an NVIDIA GPU in bf16, else blocked) |
    # "blocked" (XLA, query blocks) | "cudnn" (fused; NVIDIA GPU, bf16)
    c.distill.layers.attention_impl = "auto"
    c.distill.layers.eval_every_tokens = 10_000_000  # between evaluations (0 = first and last)
    c.distill.layers.checkpoint_every_tokens = 5_000_000  # between checkpoints (0 = at the end)
    # Stage 2: every parameter trained on KL(teacher || student) of the next-token
    # distributions; AdamW, constant learning rates in two groups.
    c.distill.kl = ml_collections.ConfigDict()
    c.distill.kl.train_tokens = 600_000_000  # training tokens (release: 600M)
    c.distill.kl.batch_size = 32  # sequences per step (a multiple of the mesh's devices)
    c.distill.kl.seq_len = 4096  # tokens per sequence
    c.distill.kl.lr_mixer = 1e-4  # learning rate of the student mixers' parameters
    c.distill.kl.lr_rest = 7e-6  # learning rate of every other parameter
    c.distill.kl.warmup_fraction = 0.0  # share of the steps spent warming up from 0
    c.distill.kl.weight_decay = 0.0  # AdamW weight decay (matrices only)
    c.distill.kl.clip_norm = 1.0  # global gradient-norm clip
    c.distill.kl.chunk_size = 512  # positions per KL chunk ([B, chunk, vocab] logits at a time)
    c.distill.kl.dtype = "bfloat16"  # compute dtype ("float32" | "bfloat16"); params fp32
    c.distill.kl.remat = True  # recompute each block in the backward pass (less memory)
    c.distill.kl.attention_impl = "auto"  # both models' attention, as distill.layers'
    c.distill.kl.eval_every_tokens = 50_000_000  # between evaluations (0 = first and last)
    c.distill.kl.checkpoint_every_tokens = 20_000_000  # between checkpoints (0 = at the end)
    return c


def apply_pod(c, num_devices: int):
    """Runs a config on a multi-host slice of `num_devices` devices: processes joined by
    jax.distributed, the mesh layers (num_devices / 2) x data 1 x fsdp 2 (a data axis of 1
    keeps the Pallas kernel out of the SPMD partitioner; params split over "fsdp"), and one
    sequence per device in the evaluation, selection and calibration batches."""
    c.mesh.distributed = True
    c.mesh.layers = -1  # num_devices / 2
    c.mesh.data = 1
    c.mesh.fsdp = 2
    c.eval.batch_size = num_devices
    c.select.batch_size = num_devices
    c.calibration.num_sequences = num_devices
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
    c.calibration.seq_len = 32
    c.calibration.block_size = 16
    c.calibration.align.steps = 20
    c.calibration.gdn.chunk_size = 16
    c.select.num_sequences = 4
    c.select.seq_len = 32
    for stage in (c.distill.layers, c.distill.kl):
        stage.train_tokens = 4 * 4 * 32
        stage.batch_size = 4
        stage.seq_len = 32
        stage.dtype = "float32"
        stage.eval_every_tokens = 2 * 4 * 32
        stage.checkpoint_every_tokens = 2 * 4 * 32
    c.distill.kl.chunk_size = 16
    c.distill.log_every = 1
    c.progress = False
    return c
