"""Wall time of the whole Taylor-Calibrate initialisation (docs/benchmarks.md §2-3).

Qwen2.5-1.5B shape by default (28 layers, hidden 1536, 12 heads, 2 kv heads, head dim 128,
MLP 8960, vocab 151936, tied embeddings), random weights, 21 converted layers (uniform 25%
kept: 0, 4, ..., 24), calibration batch 4 x 256, 300 alignment steps:

    python launch/bench_init_time.py                   # one H100: the reference figure
    python launch/bench_init_time.py --mesh_layers=-1  # all local devices on the layer axis
    python launch/bench_init_time.py --small           # a seconds-long CPU dry run

Phases, each timed cold (first call: tracing + compilation + run) and warm (second call,
same shapes): statistics (blockwise teacher pass over the converted layers), phase 1
(copy + closed-form calibration), phase 2 (alignment of all converted layers at once); plus
a plain teacher forward (logits) on the same batch for the statistics throughput ratio.
Writes launch/results/bench_init_time_<tag>.json (device, versions, date, command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io
from absl import app, flags


def define_flags() -> None:
    q = model_shapes.QWEN2_5_1_5B
    flags.DEFINE_bool("small", False, "Tiny shapes (CPU dry run).")
    flags.DEFINE_integer("layers", q["layers"], "Layers.")
    flags.DEFINE_integer("hidden", q["hidden"], "Hidden size.")
    flags.DEFINE_integer("heads", q["heads"], "Query heads.")
    flags.DEFINE_integer("kv_heads", q["kv"], "Key/value heads.")
    flags.DEFINE_integer("head_dim", q["head_dim"], "Head dim.")
    flags.DEFINE_integer("intermediate", q["mlp"], "MLP width.")
    flags.DEFINE_integer("vocab", q["vocab"], "Vocabulary.")
    flags.DEFINE_integer("keep_every", 4, "Keep attention in every k-th layer.")
    flags.DEFINE_integer("num_sequences", 4, "Calibration sequences.")
    flags.DEFINE_integer("seq_len", 256, "Calibration sequence length.")
    flags.DEFINE_integer("align_steps", 300, "Alignment steps.")
    flags.DEFINE_integer("block_size", 128, "Statistics block size.")
    flags.DEFINE_integer("mesh_layers", 1, "Devices on the layer axis (-1: all).")
    flags.DEFINE_integer("mesh_data", 1, "Devices on the data axis.")
    flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation.")
    flags.DEFINE_integer("repeats", 2, "1: cold only; 2: cold and warm.")
    flags.DEFINE_string("tag", "", "Result file tag (default: device kind).")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


def timed(fn):
    """(fn(), seconds until its result is ready)."""
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def repeat_labels(repeats: int) -> tuple[str, ...]:
    """("cold",) or ("cold", "warm"): the first call compiles, the second reuses it."""
    return ("cold", "warm")[: max(1, min(2, repeats))]


@dataclasses.dataclass(frozen=True, eq=False)
class InitProblem:
    """One initialisation to time: the teacher (`model` of `config`, `params`), its calibration
    tokens [N, T], the student (`student`, `mixer`; its converted layers are initialised) and
    the phase settings (`consts` for phase 1, `align_cfg` for phase 2, statistics in blocks of
    `block_size` positions)."""

    config: object  # ModelConfig
    model: object  # Transformer
    params: object
    tokens_nt: object
    student: object  # StudentConfig
    mixer: object  # StudentMixer
    consts: object  # taylor.TaylorConstants
    align_cfg: object  # align.AlignConfig
    block_size: int


def init_problem(config, params, tokens_nt, *, keep_every, gdn_impl, align_steps, block_size):
    """The InitProblem of a GDN student keeping attention in every `keep_every`-th layer,
    phases 1 and 2 at configs/common.py's settings but for `align_steps` alignment steps."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import common

    from taylorcal_jax.calibrate import align, taylor
    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import Transformer

    keep = tuple(range(0, config.num_hidden_layers, keep_every))
    student = StudentConfig.from_teacher(config, keep, mixer="gdn")
    c = common.get_config()
    c.calibration.align.steps = align_steps
    return InitProblem(
        config=config,
        model=Transformer(config),
        params=params,
        tokens_nt=tokens_nt,
        student=student,
        mixer=student.student_mixer(GDNRuntime(impl=gdn_impl)),
        consts=taylor.TaylorConstants.from_config(c.calibration),
        align_cfg=align.AlignConfig.from_config(c.calibration.align),
        block_size=block_size,
    )


def time_phases(problem: InitProblem, mesh, stats_mesh=None):
    """One initialisation, each phase timed to its ready result: statistics (blockwise teacher
    pass over the converted layers; the sequences split over `stats_mesh` if given), phase 1
    (copy + closed-form calibration), phase 2 (alignment of every converted layer at once,
    layers split over `mesh`'s "layers" axis).

    Returns (aligned student params, alignment metrics,
    {"statistics_s", "phase1_s", "phase2_s", "total_s"}).
    """
    import jax

    from taylorcal_jax.calibrate import align, stats, taylor
    from taylorcal_jax.convert.naive import copy_init

    config, mixer = problem.config, problem.mixer
    converted = problem.student.converted_layers
    st, t_stats = timed(
        lambda: stats.collect(
            problem.model,
            problem.params,
            config,
            problem.tokens_nt,
            layers=converted,
            block_size=problem.block_size,
            sequences_per_batch=problem.tokens_nt.shape[0],
            mesh=stats_mesh,
        )
    )
    (calibrated, _), t_p1 = timed(
        lambda: taylor.taylor_init(
            copy_init(problem.params, problem.student, jax.random.PRNGKey(2)),
            st,
            converted,
            model_config=config,
            mixer=mixer,
            consts=problem.consts,
        )
    )
    (aligned, metrics), t_p2 = timed(
        lambda: align.align_student(
            calibrated, st, converted, align.AlignSetup(config, mixer, problem.align_cfg, mesh)
        )
    )
    seconds = {"statistics_s": t_stats, "phase1_s": t_p1, "phase2_s": t_p2}
    return aligned, metrics, {**seconds, "total_s": t_stats + t_p1 + t_p2}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.models.teacher import init_params
    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.utils import sharding

    f = flags.FLAGS
    shape = dict(
        layers=f.layers,
        hidden=f.hidden,
        heads=f.heads,
        kv=f.kv_heads,
        head_dim=f.head_dim,
        mlp=f.intermediate,
        vocab=f.vocab,
        n=f.num_sequences,
        t=f.seq_len,
        steps=f.align_steps,
    )
    if f.small:
        shape.update(
            layers=4, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256, n=2, t=64, steps=10
        )
    cfg = model_shapes.qwen2_config(shape, 32768)
    axes = {"layers": f.mesh_layers, "data": f.mesh_data}
    n_dev = f.mesh_layers * f.mesh_data
    mesh = sharding.make_mesh(axes, jax.devices()[:n_dev] if n_dev > 0 else None)

    params, init_s = timed(lambda: jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (shape["n"], shape["t"]), 0, cfg.vocab_size)
    problem = init_problem(
        cfg,
        params,
        tokens,
        keep_every=f.keep_every,
        gdn_impl=f.gdn_impl,
        align_steps=shape["steps"],
        block_size=f.block_size,
    )
    fwd = jax.jit(lambda p, x: problem.model.apply({"params": p}, x)[0])

    timings = {}
    n_tok = shape["n"] * shape["t"]
    for label in repeat_labels(f.repeats):
        _, t_fwd = timed(lambda: fwd(params, tokens))
        _, metrics, phases = time_phases(problem, mesh)  # statistics unsplit, as on one device
        timings[label] = {"teacher_forward_s": t_fwd, **phases}
        print(label, {k: round(v, 3) for k, v in timings[label].items()}, flush=True)
        last = timings[label]  # throughput from the latest (warm when there is one) repeat
        result = {
            "benchmark": "full Taylor-Calibrate initialisation (statistics + phase 1 + phase 2)",
            "shape": shape,
            "converted_layers": list(problem.student.converted_layers),
            "keep_full_attention_layers": list(problem.student.keep_full_attention_layers),
            "mesh": dict(mesh.shape),
            "gdn_impl": f.gdn_impl,
            "gdn_impl_resolved": api.resolve_impl(f.gdn_impl),
            "timings": timings,
            "statistics_tokens_per_s": n_tok / last["statistics_s"],
            "teacher_forward_tokens_per_s": n_tok / last["teacher_forward_s"],
            "align_loss_before_mean": float(jnp.mean(metrics["loss_before"])),
            "align_loss_after_mean": float(jnp.mean(metrics["loss_after"])),
            "param_init_s": init_s,
            **results_io.provenance(),
        }
        # written after every repeat: a run cut short during the warm repeat keeps the cold one
        path = results_io.write_result(f.out, "bench_init_time", f.tag, f.small, result)
    print(json.dumps({k: v for k, v in result.items() if k != "shape"}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    define_flags()
    app.run(main)
