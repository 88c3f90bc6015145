"""The distillation stages: `distill_layers` (stage 1) and `distill` (stage 2).

    distill_layers  the student of train/student_dirs.py (the calibrated one) -> its converted
                    layers' mixers trained teacher-forced on a token stream
                    (train/distill_layers.py) -> <workdir>/student_distill_layers
    distill         the latest student before it (stage 1's when listed) -> every parameter
                    trained on KL(teacher || student) (train/distill.py)
                    -> <workdir>/student_distilled

Both train on the training loop (train/loop.py) with batches of `batch_size` x `seq_len`
tokens of split `distill.split`, batch s a pure function of (distill.seed, stage, s): every
init sees the same data in the same order, and stage 2 does not start over the windows
stage 1 trained on (`batch_seed`). Token figures (`train_tokens`, `eval_every_tokens`,
`checkpoint_every_tokens`) become steps rounded up. The loop's orbax checkpoints (params,
optimiser state, data position, RNG) live in <workdir>/<stage>_train/checkpoints, so a
rerun after a crash resumes and ends bit-for-bit where an uninterrupted run ends (CPU);
they are removed once the stage's student is written.

metrics.jsonl rows of a stage (with `tokens` = steps x batch_size x seq_len seen so far):
every `distill.log_every` steps and at the end {step, tokens, loss, grad_norm,
train_seconds}; at tokens 0 (a fresh run), every `eval_every_tokens` and at the end
{step, tokens, eval_ppl, eval_nll} of the student (float32) on the eval set (section
`eval`). With `distill.save_students` every evaluation also writes the student to
<workdir>/<stage>_train/students/tokens_<tokens, 12 digits> (those of an earlier run are
removed when the stage starts afresh, kept when it resumes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.calibrate import pipeline
from taylorcal_jax.calibrate.stacking import stack_mixers, unstack_mixers
from taylorcal_jax.data import packing, split
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.eval import training_curves
from taylorcal_jax.models.layers import resolve_sequence_impl
from taylorcal_jax.run import validate as check
from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.run.plan import Sample, Stage, section_sample
from taylorcal_jax.train import distill as kl_lib
from taylorcal_jax.train import distill_layers as layers_lib
from taylorcal_jax.train import layerwise, loop, student_dirs
from taylorcal_jax.train.stages import DTYPES, check_eval, device_description
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.checkpoint import has_checkpoint

STAGE_LAYERS = "distill_layers"
STAGE_KL = "distill"
SECTIONS = {STAGE_LAYERS: "layers", STAGE_KL: "kl"}


def train_dir(stage: str) -> str:
    """Workdir-relative directory of a stage's checkpoints and saved students."""
    return f"{stage}_train"


def checkpoint_dir(stage: str) -> str:
    """Workdir-relative directory of a stage's orbax checkpoints."""
    return os.path.join(train_dir(stage), "checkpoints")


# ---------------------------------------------------------------------------- budget


@dataclasses.dataclass(frozen=True)
class Budget:
    """A stage's token figures in steps of batch_size x seq_len tokens (rounded up)."""

    batch_size: int
    seq_len: int
    train_tokens: int
    eval_every_tokens: int
    checkpoint_every_tokens: int
    warmup_fraction: float

    @classmethod
    def from_config(cls, section) -> Budget:
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def steps_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.tokens_per_step)

    @property
    def steps(self) -> int:
        return self.steps_for(self.train_tokens)

    @property
    def warmup_steps(self) -> int:
        # rounded up, but not for a float's last bit (0.07 * 100 = 7.000000000000001 -> 7);
        # none in a one-step run: the warm-up's first step has lr 0, so it would train nothing
        if self.steps == 1:
            return 0
        return math.ceil(round(self.warmup_fraction * self.steps, 9))


# ---------------------------------------------------------------------------- checks


def check_distill_common(config, arch) -> None:
    check.one_of(config, "distill.split", split.SPLITS)
    check.positive(config, "distill.log_every")
    check.not_eval_split(config, "distill.split", "distillation would train on")


def _check_budget(config, section: str, arch) -> None:
    s = f"distill.{section}"
    check.positive(config, f"{s}.train_tokens", f"{s}.batch_size", f"{s}.clip_norm")
    check.at_least(config, f"{s}.seq_len", 2)
    check.fits_positions(config, f"{s}.seq_len", arch)
    check.at_least(config, f"{s}.eval_every_tokens", 0)
    check.at_least(config, f"{s}.checkpoint_every_tokens", 0)
    check.at_least(config, f"{s}.weight_decay", 0.0)
    check.one_of(config, f"{s}.dtype", tuple(DTYPES))
    frac = config.distill[section].warmup_fraction
    if not 0 <= frac <= 1:
        raise check.ConfigError(f"{s}.warmup_fraction must be in [0, 1], got {frac}")


def _check_attention(config, section: str) -> None:
    """The stage's teacher (and student) attention implementation is known and, for cuDNN,
    in bf16 ("auto" always can run: layers.resolve_sequence_impl picks one that does)."""
    from taylorcal_jax.models.layers import SEQUENCE_CHOICES  # noqa: PLC0415

    s = f"distill.{section}"
    check.one_of(config, f"{s}.attention_impl", SEQUENCE_CHOICES)
    options = config.distill[section]
    if options.attention_impl == "cudnn" and options.dtype != "bfloat16":
        raise check.ConfigError(
            f"{s}.attention_impl='cudnn' needs {s}.dtype='bfloat16'",
            "cuDNN's fused attention takes bf16/fp16 only; or use 'blocked'",
        )


def check_attention_backend(config, sizes, *, section: str) -> None:
    """cuDNN's attention needs a GPU. A device check: asking for the backend starts it, which
    must come after jax.distributed.initialize (run/runner.prepare)."""
    from taylorcal_jax.ops.dispatch import GPU_BACKENDS  # noqa: PLC0415

    s = f"distill.{section}"
    if config.distill[section].attention_impl != "cudnn":
        return
    if jax.default_backend() not in GPU_BACKENDS:
        raise check.ConfigError(
            f"{s}.attention_impl='cudnn' needs a GPU, not {jax.default_backend()!r}",
            "use 'blocked'",
        )


def check_distill_layers(config, arch) -> None:
    check_distill_common(config, arch)
    _check_budget(config, "layers", arch)
    _check_attention(config, "layers")
    check.positive(config, "distill.layers.learning_rate")
    ratio = config.distill.layers.min_lr_ratio
    if not 0 <= ratio <= 1:
        raise check.ConfigError(f"distill.layers.min_lr_ratio must be in [0, 1], got {ratio}")


def check_distill_kl(config, arch) -> None:
    check_distill_common(config, arch)
    _check_budget(config, "kl", arch)
    _check_attention(config, "kl")
    check.positive(config, "distill.kl.lr_mixer", "distill.kl.lr_rest", "distill.kl.chunk_size")


def check_layers_split(config, sizes) -> None:
    """Stage 1 splits its batch over the mesh's "data" axis."""
    b, data = config.distill.layers.batch_size, sizes["data"]
    if b % data:
        raise check.ConfigError(
            f"distill.layers.batch_size={b} does not split over mesh.data={data} devices",
            f"use a multiple of {data}",
        )


def check_kl_split(config, sizes) -> None:
    """Stage 2 splits its batch over every device (every axis of the mesh)."""
    b, devices = config.distill.kl.batch_size, math.prod(sizes.values())
    if b % devices:
        raise check.ConfigError(
            f"distill.kl.batch_size={b} does not split over the {devices} devices of the mesh",
            f"use a multiple of {devices}",
        )


# ----------------------------------------------------------------------------- driver


def _student_output(ctx, stage: str, sc, params) -> str:
    path = ctx.path(student_dirs.STUDENT_DIRS[stage])
    pipeline.save_student_dir(path, sc, params, tokenizer=ctx.corpus.tokenizer)
    return path


def batch_seed(seed: int, stage: str) -> int:
    """The seed of a stage's batches: packing.train_batch draws window offsets from its seed
    and the step alone, so under one seed both stages would cut windows at about the same
    offsets, step for step."""
    stage_index = list(SECTIONS).index(stage)
    return int(np.random.SeedSequence([int(seed), stage_index]).generate_state(1)[0])


def _train(ctx, stage: str, task, params, budget: Budget, *, constants, student_of, sc):
    """Runs `task` from `params` on the stream (module docstring); returns (final params,
    loop result, {eval figures at tokens 0 and at the end}). student_of(params) -> the
    student's params, evaluated and saved."""
    config = ctx.config
    stream = ctx.corpus.stream(config.distill.split)
    seed = int(config.distill.seed)
    # (a stream too short for these windows was refused when the corpus was built: the
    # stage's `samples`, run/inputs.check_samples)
    batches = loop.StreamBatches(
        functools.partial(
            packing.train_batch, stream, budget.batch_size, budget.seq_len, batch_seed(seed, stage)
        )
    )
    eval_seqs = ctx.sequences(config.eval)
    eval_model = sc.model(runtime=pipeline.student_mixer(config, sc.teacher).runtime)
    tps = budget.tokens_per_step

    def evaluate(params) -> dict:
        r = ppl_lib.perplexity(
            eval_model,
            student_of(params),
            eval_seqs,
            batch_size=int(config.eval.batch_size),
            mesh=ctx.mesh,
            desc=f"{stage} eval",
        )
        return {"eval_ppl": r["ppl"], "eval_nll": r["nll"]}

    students = ctx.path(train_dir(stage), "students")
    evaluated = {}

    def eval_fn(params):
        evaluated["params"] = params  # saved by log_fn, which learns the step
        return evaluate(params)

    def log_fn(step, values):
        ctx.metrics.write(stage, step=step, tokens=step * tps, **values)
        if "eval_ppl" in values:
            training_curves.write_plot(ctx.workdir, training_curves.DURING_TRAINING_S)
        if "eval_ppl" in values and config.distill.save_students:
            path = os.path.join(students, f"tokens_{step * tps:012d}")  # sorts by tokens
            params = student_of(evaluated.pop("params"))
            pipeline.save_student_dir(path, sc, params, tokenizer=ctx.corpus.tokenizer)

    ckpt_dir = ctx.path(checkpoint_dir(stage))
    first = {}
    if not has_checkpoint(ckpt_dir):
        workdir_lib.remove(students)  # saved by an earlier run, which this one does not continue
        first = evaluate(params)
        evaluated["params"] = params
        log_fn(0, first)
    opts = loop.LoopOptions(
        steps=budget.steps,
        steps_per_call=1,
        log_every=int(config.distill.log_every),
        eval_every=budget.steps_for(budget.eval_every_tokens),
        checkpoint_every=budget.steps_for(budget.checkpoint_every_tokens),
        desc=stage,
    )
    state = loop.init_state(task, params, rng=jax.random.PRNGKey(seed))
    result = loop.run(
        task,
        state,
        batches,
        opts,
        mesh=ctx.mesh,
        checkpoint_dir=ckpt_dir,
        log_fn=log_fn,
        eval_fn=eval_fn,
        constants=constants,
    )
    last = evaluate(result.state.params)
    evaluated["params"] = result.state.params
    log_fn(budget.steps, last)
    return result, first, last


def _write_student(ctx, stage: str, sc, params) -> str:
    """Writes the stage's student, then removes its checkpoints, which it supersedes (they
    hold the params and the optimiser state, twice as much again); returns its path."""
    path = _student_output(ctx, stage, sc, params)
    workdir_lib.remove(ctx.path(checkpoint_dir(stage)))
    return path


def _summary(budget: Budget, result, first: dict, last: dict, path: str) -> dict:
    seconds = float(result.train_seconds)
    tokens = budget.steps * budget.tokens_per_step
    return {
        "steps": budget.steps,
        "tokens": tokens,
        "eval_ppl_before": first.get("eval_ppl"),  # None when resumed
        "eval_ppl": last["eval_ppl"],
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "device": device_description(),
        "student": path,
    }


def _load_source(ctx, stage: str):
    """(StudentConfig, float32 params, the student mixer with the config's runtime options)."""
    from taylorcal_jax.models.student import load_student  # noqa: PLC0415

    sc, params = load_student(ctx.path(student_dirs.student_dir(ctx.config, stage)))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    mixer = sc.student_mixer(pipeline.student_mixer(ctx.config, sc.teacher).runtime)
    return sc, params, mixer


# ----------------------------------------------------------------------------- stages


def distill_layers_stage(ctx) -> dict:
    """Stage 1 on every converted layer of the student; writes <workdir>/student_distill_layers."""
    config = ctx.config
    s = config.distill.layers
    sc, student, mixer = _load_source(ctx, STAGE_LAYERS)
    layers = sc.converted_layers
    if not layers:
        path = _student_output(ctx, STAGE_LAYERS, sc, student)
        out = {"converted_layers": 0, "student": path}
        ctx.metrics.write(STAGE_LAYERS, **out)
        return out
    _, teacher_params = ctx.teacher
    budget = Budget.from_config(s)
    cfg = layers_lib.LayerDistillConfig(
        steps=budget.steps,
        learning_rate=float(s.learning_rate),
        warmup_steps=budget.warmup_steps,
        min_lr_ratio=float(s.min_lr_ratio),
        weight_decay=float(s.weight_decay),
        clip_norm=float(s.clip_norm),
        dtype=str(s.dtype),
        remat=bool(s.remat),
        attention_impl=resolve_sequence_impl(str(s.attention_impl), DTYPES[s.dtype]),
    )
    task = layers_lib.make_task(sc.teacher, mixer, layers, cfg, ctx.mesh)
    pad = layerwise.layer_padding(len(layers), ctx.mesh)
    stacked = layerwise.pad_layers(stack_mixers(student, layers, mixer.name), pad)

    def student_of(params):
        real = jax.tree.map(lambda a: a[: len(layers)], params)
        return unstack_mixers(student, layers, real, mixer.name)

    result, first, last = _train(
        ctx,
        STAGE_LAYERS,
        task,
        stacked,
        budget,
        constants=teacher_params,
        student_of=student_of,
        sc=sc,
    )
    path = _write_student(ctx, STAGE_LAYERS, sc, student_of(result.state.params))
    out = _summary(budget, result, first, last, path)
    out["converted_layers"] = len(layers)
    ctx.metrics.write(STAGE_LAYERS, **out)
    return out


def distill_stage(ctx) -> dict:
    """Stage 2 on the whole student; writes <workdir>/student_distilled."""
    config = ctx.config
    k = config.distill.kl
    sc, student, mixer = _load_source(ctx, STAGE_KL)
    _, teacher_params = ctx.teacher
    budget = Budget.from_config(k)
    cfg = kl_lib.KLDistillConfig(
        lr_mixer=float(k.lr_mixer),
        lr_rest=float(k.lr_rest),
        warmup_steps=budget.warmup_steps,
        weight_decay=float(k.weight_decay),
        clip_norm=float(k.clip_norm),
        chunk_size=int(k.chunk_size),
    )
    student_model, teacher_model = kl_lib.stage2_models(
        sc,
        mixer.runtime,
        DTYPES[k.dtype],
        remat=bool(k.remat),
        attention_impl=resolve_sequence_impl(str(k.attention_impl), DTYPES[k.dtype]),
    )
    task = kl_lib.make_task(
        student_model, teacher_model, mixer.name, cfg, ctx.mesh, sharding.param_spec(ctx.mesh)
    )
    result, first, last = _train(
        ctx,
        STAGE_KL,
        task,
        student,
        budget,
        constants=teacher_params,
        student_of=lambda params: params,
        sc=sc,
    )
    path = _write_student(ctx, STAGE_KL, sc, result.state.params)
    out = _summary(budget, result, first, last, path)
    ctx.metrics.write(STAGE_KL, **out)
    return out


def _stage(name: str, run, summary: str, check_section, device_check, mesh_axes=()) -> Stage:
    section = f"distill.{SECTIONS[name]}"
    return Stage(
        name=name,
        run=run,
        summary=summary,
        # the eval section: the held-out set of its perplexities along training (its result)
        reads=("distill.split", "distill.seed", section, "eval"),
        # What changes only speed, memory or what is measured along the way.
        ignores=tuple(
            f"{section}.{k}" for k in ("eval_every_tokens", "checkpoint_every_tokens", "remat")
        )
        + ("eval.batch_size",),
        inputs=lambda config: ("teacher", "corpus", student_dirs.source_stage(config, name)),
        outputs=(student_dirs.STUDENT_DIRS[name],),
        checkpoints=(checkpoint_dir(name),),
        checks=(pipeline.check_calibration, check_eval, check_section),
        device_checks=(
            pipeline.check_gdn_backend,
            functools.partial(check_attention_backend, section=SECTIONS[name]),
            device_check,
        ),
        checkpoint_mesh_axes=mesh_axes,
        samples=lambda c: (  # its held-out set and its training windows at random offsets
            section_sample(c, "eval"),
            Sample(
                f"{section}.seq_len",
                str(c.distill.split),
                None,
                int(c.distill[SECTIONS[name]].seq_len),
            ),
        ),
    )


STAGES = {
    STAGE_LAYERS: _stage(
        STAGE_LAYERS,
        distill_layers_stage,
        "distillation stage 1: every converted layer fitted to its teacher layer on a stream",
        check_distill_layers,
        check_layers_split,
        mesh_axes=("layers",),  # its layers are padded to a multiple of the axis
    ),
    STAGE_KL: _stage(
        STAGE_KL,
        distill_stage,
        "distillation stage 2: the whole student trained on KL(teacher || student)",
        check_distill_kl,
        check_kl_split,
    ),
}
