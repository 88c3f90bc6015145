"""The pipeline's first stages: `pretrain` (a small teacher of our own) and `eval_teacher`.

A stage is `fn(config, workdir, metrics) -> dict` (the dict goes into summary.md); main.py
runs the stages named in `config.stages`. Helpers here (`teacher_dir`, `load_teacher`,
`build_run_corpus`, `eval_sequences`) are what later stages use to find the teacher and
the evaluation data the same way.

Teacher location: `config.teacher.path` if set, else `<workdir>/teacher` (written by
`pretrain`, in HF format: config.json + model.safetensors + tokenizer files).
Tokenizer: `config.tokenizer.path`, else the teacher's directory once it has tokenizer
files, else a BPE trained on the train split (see data/corpus.py).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp

from taylorcal_jax.data import corpus as corpus_lib
from taylorcal_jax.data import split
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
from taylorcal_jax.train import pretrain as pretrain_lib

INFO_FILE = "pretrain_info.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------- validation


def validate(config) -> None:
    """Clear errors for bad values in the data/tokenizer/teacher/pretrain/eval/mesh sections."""
    corpus_lib.check_data_config(config.data)
    t = config.teacher
    if not t.path:
        if t.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"teacher.model_type must be one of {SUPPORTED_MODEL_TYPES}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"teacher.dtype must be one of {sorted(_DTYPES)}, got {t.dtype!r}")
        if t.vocab_multiple <= 0:
            raise ValueError(f"teacher.vocab_multiple must be positive, got {t.vocab_multiple}")
        pretrain_lib.PretrainOptions.from_config(config.pretrain)
        if config.pretrain.seq_len > t.max_position_embeddings:
            raise ValueError(
                f"pretrain.seq_len ({config.pretrain.seq_len}) > teacher.max_position_embeddings "
                f"({t.max_position_embeddings})"
            )
        if config.eval.seq_len > t.max_position_embeddings:
            raise ValueError(
                f"eval.seq_len ({config.eval.seq_len}) > teacher.max_position_embeddings "
                f"({t.max_position_embeddings})"
            )
        if config.pretrain.eval_sequences <= 0:
            raise ValueError("pretrain.eval_sequences must be positive")
    if not t.path and not config.tokenizer.path and config.tokenizer.vocab_size < 259:
        raise ValueError(f"tokenizer.vocab_size must be >= 259, got {config.tokenizer.vocab_size}")
    if config.eval.split not in split.SPLITS:
        raise ValueError(f"eval.split must be one of {split.SPLITS}, got {config.eval.split!r}")
    for name in ("num_sequences", "seq_len", "batch_size"):
        if config.eval[name] <= 0:
            raise ValueError(f"eval.{name} must be positive, got {config.eval[name]}")
    if config.eval.seq_len < 2:
        raise ValueError("eval.seq_len must be at least 2 (one predicted token)")
    if len(tuple(config.mesh.shape)) != len(tuple(config.mesh.axes)):
        raise ValueError(f"mesh.shape {config.mesh.shape} and mesh.axes {config.mesh.axes} differ")


# ---------------------------------------------------------------- shared helpers


def teacher_dir(config, workdir: str) -> str:
    return config.teacher.path or os.path.join(workdir, "teacher")


def tokenizer_path(config, workdir: str) -> str:
    if config.tokenizer.path:
        return config.tokenizer.path
    tdir = teacher_dir(config, workdir)
    if os.path.exists(os.path.join(tdir, "tokenizer_config.json")):
        return tdir
    if config.teacher.path:
        raise FileNotFoundError(
            f"teacher.path {tdir!r} has no tokenizer files; set tokenizer.path to its tokenizer"
        )
    return ""


def build_run_corpus(config, workdir: str) -> corpus_lib.Corpus:
    return corpus_lib.build_corpus(
        config.data,
        config.tokenizer,
        os.path.join(workdir, "data"),
        tokenizer_path=tokenizer_path(config, workdir),
    )


def eval_sequences(config, corpus: corpus_lib.Corpus):
    e = config.eval
    return corpus.sample(e.split, e.num_sequences, e.seq_len, e.seed)


def load_teacher(config, workdir: str):
    """(ModelConfig, params) of the teacher (pretrained here or from teacher.path)."""
    from taylorcal_jax.models import hf_io  # noqa: PLC0415

    path = teacher_dir(config, workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no teacher at {path}; run the 'pretrain' stage first or set teacher.path"
        )
    return hf_io.load_pretrained(path)


def model_config(teacher_cfg, tokenizer) -> ModelConfig:
    m = teacher_cfg.vocab_multiple
    return ModelConfig(
        model_type=teacher_cfg.model_type,
        vocab_size=-(-len(tokenizer) // m) * m,
        hidden_size=teacher_cfg.hidden_size,
        intermediate_size=teacher_cfg.intermediate_size,
        num_hidden_layers=teacher_cfg.num_hidden_layers,
        num_attention_heads=teacher_cfg.num_attention_heads,
        num_key_value_heads=teacher_cfg.num_key_value_heads,
        head_dim=teacher_cfg.head_dim,
        rms_norm_eps=teacher_cfg.rms_norm_eps,
        max_position_embeddings=teacher_cfg.max_position_embeddings,
        rope=RopeConfig(theta=float(teacher_cfg.rope_theta)),
        tie_word_embeddings=teacher_cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def device_description() -> str:
    d = jax.devices()[0]
    kind = d.device_kind if d.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"
    return f"{kind} x{jax.device_count()}" if d.platform != "cpu" else kind


def _figures(model, params, corpus, config) -> dict:
    seqs = eval_sequences(config, corpus)
    model_eval = model.clone(dtype=jnp.float32)
    ev = ppl_lib.perplexity(model_eval, params, seqs, batch_size=config.eval.batch_size)
    counts = ppl_lib.unigram_counts(corpus.stream("train"), model.config.vocab_size)
    uni = ppl_lib.unigram_perplexity(counts, seqs)
    return {
        f"{config.eval.split}_ppl": ev["ppl"],
        f"{config.eval.split}_nll": ev["nll"],
        "unigram_ppl": uni["ppl"],
        "eval_tokens": ev["tokens"],
    }


# ---------------------------------------------------------------- stages


def pretrain_stage(config, workdir: str, metrics) -> dict:
    """Trains the configured teacher on the corpus and saves it (HF format) to <workdir>/teacher."""
    if config.teacher.path:
        return {"skipped": f"teacher.path is set ({config.teacher.path})"}
    out = teacher_dir(config, workdir)
    if os.path.exists(os.path.join(out, "config.json")):
        info_path = os.path.join(out, INFO_FILE)
        info = json.load(open(info_path)) if os.path.exists(info_path) else {}
        return {"skipped": f"{out} exists", **info}
    from taylorcal_jax.models import hf_io  # noqa: PLC0415
    from taylorcal_jax.models.teacher import Transformer, init_params  # noqa: PLC0415

    corpus = build_run_corpus(config, workdir)
    mcfg = model_config(config.teacher, corpus.tokenizer)
    model = Transformer(mcfg, dtype=_DTYPES[config.teacher.dtype])
    params = init_params(mcfg, jax.random.PRNGKey(config.pretrain.seed))
    opts = pretrain_lib.PretrainOptions.from_config(config.pretrain)
    valid_seqs = corpus.sample(
        "valid", config.pretrain.eval_sequences, opts.seq_len, config.pretrain.seed
    )
    model_eval = model.clone(dtype=jnp.float32)

    def eval_fn(p):
        r = ppl_lib.perplexity(model_eval, p, valid_seqs, batch_size=config.eval.batch_size)
        return {"valid_ppl": r["ppl"], "valid_nll": r["nll"]}

    def log_fn(step, values):
        metrics.write("pretrain", step=step, **values)

    n_params = pretrain_lib.count_params(params)
    cpu0 = time.process_time()
    metrics.write(
        "pretrain",
        step=0,
        params=n_params,
        vocab_size=mcfg.vocab_size,
        train_tokens_available=int(corpus.stream("train").size),
    )
    state = pretrain_lib.pretrain(
        model,
        params,
        corpus.stream("train"),
        opts,
        os.path.join(workdir, "pretrain_ckpt"),
        eval_fn=eval_fn,
        log_fn=log_fn,
    )
    params = state["params"]
    info = {
        "params": n_params,
        "tokens": int(state["tokens"]),
        "steps": int(state["step"]),
        "train_seconds": round(float(state["train_seconds"]), 1),
        # Process CPU time of this call (all threads): with wall time, shows contention.
        "process_cpu_seconds": round(time.process_time() - cpu0, 1),
        "device": device_description(),
        **_figures(model, params, corpus, config),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_io.save_pretrained(tmp, mcfg, params)
    corpus.tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, out)
    metrics.write("pretrain", **info)
    return info


def eval_teacher_stage(config, workdir: str, metrics) -> dict:
    """Perplexity of the teacher on the eval split, next to the unigram baseline."""
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415

    mcfg, params = load_teacher(config, workdir)
    corpus = build_run_corpus(config, workdir)
    if corpus.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"tokenizer has {corpus.vocab_size} tokens but the teacher only {mcfg.vocab_size}"
        )
    t0 = time.perf_counter()
    figures = _figures(Transformer(mcfg), params, corpus, config)
    figures["eval_seconds"] = round(time.perf_counter() - t0, 2)
    figures["teacher"] = teacher_dir(config, workdir)
    metrics.write("eval_teacher", **figures)
    return figures
