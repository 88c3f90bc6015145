"""The pipeline's first stages: `pretrain` (a small teacher of our own) and `eval_teacher`.

A stage is `fn(ctx: RunContext) -> dict` (the dict goes into summary.md and the stage's
record), declared with what it reads in `STAGES` (see run/plan.py). The teacher is
`teacher.path` if set, else `<workdir>/teacher`, written here in HF format (config.json +
model.safetensors + tokenizer files + pretrain_info.json).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

from taylorcal_jax.data import split
from taylorcal_jax.errors import ConfigError
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.eval import training_curves
from taylorcal_jax.run import inputs
from taylorcal_jax.run import validate as check
from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.run.plan import Sample, Stage, section_sample
from taylorcal_jax.train import pretrain as pretrain_lib

INFO_FILE = "pretrain_info.json"
CHECKPOINT_DIR = "pretrain_ckpt"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------- checks


def check_pretrain(config, arch) -> None:
    """The `pretrain` section and the trained tokenizer's size (teacher pretrained here)."""
    check.one_of(config, "teacher.dtype", tuple(DTYPES))
    with check.config_errors("pretrain"):
        pretrain_lib.PretrainOptions.from_config(config.pretrain)
    check.positive(config, "pretrain.eval_sequences", "eval.batch_size")
    check.at_least(config, "pretrain.seq_len", 2)  # next-token targets need two tokens
    check.fits_positions(config, "pretrain.seq_len", arch)
    if not config.tokenizer.path:
        check.at_least(config, "tokenizer.vocab_size", 259)  # 256 bytes + 3 special tokens
        check.positive(config, "tokenizer.min_frequency")


def check_pretrain_split(config, sizes) -> None:
    """Each pretraining batch splits over the mesh's "data" x "fsdp" devices."""
    split = sizes["data"] * sizes["fsdp"]
    if config.pretrain.batch_size % split:
        raise ConfigError(
            f"pretrain.batch_size={config.pretrain.batch_size} does not split over "
            f"mesh.data x mesh.fsdp = {split} devices",
            f"use a multiple of {split}, or smaller mesh.data / mesh.fsdp",
        )


def check_eval(config, arch) -> None:
    check.one_of(config, "eval.split", split.SPLITS)
    if not config.teacher.path and config.eval.split == "train":
        raise ConfigError(
            "eval.split='train' is the text the teacher is pretrained on here: every perplexity "
            "would be measured on training text",
            "use eval.split='valid' (or 'test')",
        )
    check.positive(config, "eval.num_sequences", "eval.batch_size")
    check.at_least(config, "eval.seq_len", 2)  # one predicted token
    check.fits_positions(config, "eval.seq_len", arch)


# ----------------------------------------------------------------------------- helpers


def device_description() -> str:
    d = jax.devices()[0]
    kind = d.device_kind if d.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"
    return f"{kind} x{jax.device_count()}" if d.platform != "cpu" else kind


def teacher_figures(ctx, model, params) -> dict:
    """Perplexity of `model` on the eval set next to the add-one unigram baseline."""
    split = ctx.config.eval.split
    seqs = ctx.sequences(ctx.config.eval)
    ev = ppl_lib.perplexity(
        model.clone(dtype=jnp.float32),
        params,
        seqs,
        batch_size=ctx.config.eval.batch_size,
        mesh=ctx.mesh,
        desc="teacher ppl",
    )
    counts = ppl_lib.unigram_counts(ctx.corpus.stream("train"), model.config.vocab_size)
    uni = ppl_lib.unigram_perplexity(counts, seqs)
    return {
        f"{split}_ppl": ev["ppl"],
        f"{split}_nll": ev["nll"],
        "unigram_ppl": uni["ppl"],
        "eval_tokens": ev["tokens"],
    }


# ----------------------------------------------------------------------------- stages


def pretrain_stage(ctx) -> dict:
    """Trains the `teacher` architecture on the corpus; saves it (HF format) to <workdir>/teacher.

    Resumes from the orbax checkpoints in <workdir>/pretrain_ckpt. The result's valid_ppl is
    measured on the `pretrain.eval_sequences` valid sequences of the in-training evaluation.
    """
    from taylorcal_jax.models import hf_io  # noqa: PLC0415
    from taylorcal_jax.models.teacher import Transformer, init_params  # noqa: PLC0415

    config = ctx.config
    corpus = ctx.corpus
    tok = corpus.tokenizer
    vocab = inputs.model_vocab_size(config.teacher, len(tok))
    mcfg = inputs.pretrained_architecture(
        config.teacher, vocab, (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    )
    model = Transformer(mcfg, dtype=DTYPES[config.teacher.dtype])
    params = init_params(mcfg, jax.random.PRNGKey(config.pretrain.seed))
    opts = pretrain_lib.PretrainOptions.from_config(config.pretrain)
    valid_seqs = corpus.sample(
        "valid", config.pretrain.eval_sequences, opts.seq_len, config.pretrain.seed
    )
    model_eval = model.clone(dtype=jnp.float32)

    def eval_fn(p):
        r = ppl_lib.perplexity(
            model_eval,
            p,
            valid_seqs,
            batch_size=config.eval.batch_size,
            mesh=ctx.mesh,
            desc="pretrain eval",
        )
        return {"valid_ppl": r["ppl"], "valid_nll": r["nll"]}

    def log_fn(step, values):
        ctx.metrics.write("pretrain", step=step, **values)
        if "valid_ppl" in values:
            training_curves.write_plot(ctx.workdir, training_curves.DURING_TRAINING_S)

    n_params = pretrain_lib.count_params(params)
    cpu0 = time.process_time()
    ctx.metrics.write(
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
        ctx.path(CHECKPOINT_DIR),
        eval_fn=eval_fn,
        log_fn=log_fn,
        mesh=ctx.mesh,
    )
    params = state["params"]
    counts = ppl_lib.unigram_counts(corpus.stream("train"), mcfg.vocab_size)
    info = {
        "params": n_params,
        "tokens": int(state["tokens"]),
        "steps": int(state["step"]),
        "train_seconds": round(float(state["train_seconds"]), 1),
        # Process CPU time of this call (all threads): with wall time, shows contention.
        "process_cpu_seconds": round(time.process_time() - cpu0, 1),
        "device": device_description(),
        **eval_fn(params),
        "unigram_ppl": ppl_lib.unigram_perplexity(counts, valid_seqs)["ppl"],
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with workdir_lib.output_dir(ctx.teacher_dir) as tmp:
        hf_io.save_pretrained(tmp, mcfg, params)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
    ctx.metrics.write("pretrain", **info)
    return info


def eval_teacher_stage(ctx) -> dict:
    """Perplexity of the teacher on the eval split, next to the unigram baseline."""
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415

    mcfg, params = ctx.teacher
    t0 = time.perf_counter()
    figures = teacher_figures(ctx, Transformer(mcfg), params)
    figures["eval_seconds"] = round(time.perf_counter() - t0, 2)
    figures["teacher"] = ctx.teacher_dir
    ctx.metrics.write("eval_teacher", **figures)
    return figures


STAGES = {
    "pretrain": Stage(
        name="pretrain",
        run=pretrain_stage,
        summary="pretrains the configured teacher on the train split (resumes from checkpoints)",
        reads=("teacher", "pretrain"),
        # what it logs, saves or evaluates along the way changes no parameter
        ignores=(
            "teacher.path",
            "pretrain.log_every",
            "pretrain.checkpoint_every",
            "pretrain.eval_every",
            "pretrain.eval_sequences",
        ),
        inputs=lambda config: ("corpus",),
        outputs=(inputs.TEACHER_DIR,),
        checkpoints=(CHECKPOINT_DIR,),
        not_needed=lambda config: "teacher.path is set" if config.teacher.path else "",
        samples=lambda c: (
            Sample("pretrain.seq_len", "train", None, int(c.pretrain.seq_len)),
            Sample(
                "pretrain.eval_sequences",
                "valid",
                int(c.pretrain.eval_sequences),
                int(c.pretrain.seq_len),
            ),
        ),
        checks=(check_pretrain,),
        device_checks=(check_pretrain_split,),
    ),
    "eval_teacher": Stage(
        name="eval_teacher",
        run=eval_teacher_stage,
        summary="perplexity of the teacher on the eval split, next to a unigram baseline",
        reads=("eval",),
        samples=lambda c: (section_sample(c, "eval"),),
        ignores=("eval.batch_size",),
        inputs=lambda config: ("teacher", "corpus"),
        checks=(check_eval,),
    ),
}
