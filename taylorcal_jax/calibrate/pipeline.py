"""CLI stages of Taylor-Calibrate: statistics, calibrate, align, select_layers, eval_student.

Letters: L layers, H heads, N sequences, T time.

Each stage is `fn(ctx: RunContext) -> dict` (see run/plan.py and taylorcal_jax/main.py)
and passes its results to the next through files under <workdir>/calibration:

    statistics     teacher pass on `calibration.num_sequences` x `calibration.seq_len` tokens
                   of `calibration.split` -> stats.npz (distance, entropy [L, H]; teacher-forced
                   x, context, attention output of every layer)
    calibrate      `calibration.strategy` up to phase 1 for every layer -> init/ (a student
                   directory with every layer converted) + init_report.json
    align          phase 2 for every layer (strategies with phase 2 only) -> aligned/ +
                   align_report.json; checkpoints in align_ckpt/ every
                   `calibration.align.checkpoint_every` steps (a rerun resumes from the last;
                   removed once the outputs are written)
    select_layers  keep_full_attention_layers by `select.policy` / `select.kept_fraction` (or
                   `select.keep_layers`) -> <workdir>/student (the calibrated student)
    eval_student   perplexity of the latest student (train/student_dirs.py: the calibrated
                   one, or the distilled one when distillation stages precede it; zero-shot
                   for the calibrated one) and of the teacher on the eval set ->
                   calibration_report.json and calibration_report.png (per layer and head:
                   teacher distance and entropy, half-life, write gate, value scale,
                   alignment loss before/after, teacher-forced layer loss)

On the tiny teacher (after its `pretrain` stage):

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny \
      --config.stages='("pretrain","statistics","calibrate","align","select_layers","eval_student")'

Every layer is calibrated (not only the converted ones): phases are teacher-forced per
layer, so this costs L/|converted| more and lets any keep set, and the policies that try
many, reuse the same mixers.

Statistics run in chunks of `calibration.sequences_per_batch` sequences per device, data
parallel over the run's mesh; chunk c with c_n valid query positions gives per-head means
m_c, merged as m = sum_c c_n m_c / sum_c c_n (what one pass over all sequences computes).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.calibrate import align as align_lib
from taylorcal_jax.calibrate import select
from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.calibrate import taylor as taylor_lib
from taylorcal_jax.data import split
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.paths import layer_mixer
from taylorcal_jax.ops.dispatch import GPU_BACKENDS, TPU_BACKEND
from taylorcal_jax.ops.gdn.api import IMPLS, PALLAS_RESIDUALS
from taylorcal_jax.run import validate as check
from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.run.plan import Stage, section_sample
from taylorcal_jax.train import student_dirs
from taylorcal_jax.train.stages import check_eval
from taylorcal_jax.utils import hosts, sharding
from taylorcal_jax.utils.progress import progress

CAL_DIR = "calibration"
STATS_FILE = "stats.npz"
REPORT_JSON = "calibration_report.json"
REPORT_PNG = "calibration_report.png"
STUDENT_DIR = student_dirs.STUDENT_DIRS["select_layers"]
ALIGN_CHECKPOINT_DIR = "align_ckpt"


def _rel(*parts) -> str:
    return os.path.join(CAL_DIR, *parts)


# ------------------------------------------------------------------------ config helpers


def student_mixer(config, model_config) -> StudentMixer:
    """The GDN student mixer of section `calibration.gdn`: architecture and runtime options."""
    return StudentMixer.from_options("gdn", model_config, config.calibration.gdn.to_dict())


def calibration_context(config, model_config, mesh) -> select.CalibrationContext:
    c = config.calibration
    return select.CalibrationContext(
        model_config=model_config,
        mixer=student_mixer(config, model_config),
        consts=taylor_lib.TaylorConstants.from_config(c),
        align_cfg=align_lib.AlignConfig.from_config(c.align),
        mesh=mesh,
        seed=int(c.init_seed),
    )


def uses_align(config) -> bool:
    return select.uses_phase(config.calibration.strategy, "align")


# ---------------------------------------------------------------------------- checks


def check_calibration(config, arch) -> None:
    """The `calibration` section, its GDN options against the teacher's heads included."""
    c = "calibration"
    check.one_of(config, f"{c}.strategy", select.STRATEGIES)
    check.one_of(config, f"{c}.split", split.SPLITS)
    if select.uses_phase(config.calibration.strategy, "taylor") or uses_align(config):
        # (else the statistics feed the report only)
        check.not_eval_split(config, f"{c}.split", "phase 1 or the alignment would fit")
    check.one_of(config, f"{c}.teacher_pass", stats_lib.TEACHER_PASSES)
    check.one_of(config, f"{c}.write_gate", taylor_lib.WRITE_GATE_RULES)
    check.one_of(config, f"{c}.gdn.impl", IMPLS)
    check.one_of(config, f"{c}.gdn.pallas_residuals", PALLAS_RESIDUALS)
    check.positive(config, *(f"{c}.{k}" for k in ("num_sequences", "block_size")))
    check.positive(config, f"{c}.sequences_per_batch", f"{c}.seq_len")
    check.fits_positions(config, f"{c}.seq_len", arch)
    with check.config_errors(c):
        taylor_lib.TaylorConstants.from_config(config.calibration)
    with check.config_errors(f"{c}.align"):
        align_lib.AlignConfig.from_config(config.calibration.align)
    with check.config_errors(f"{c}.gdn"):
        student_mixer(config, arch)


def check_gdn_backend(config, sizes) -> None:
    """The Pallas kernels need a GPU (asking for them elsewhere is an error, not a fallback);
    the decoding step's kernel also runs on a CPU, in interpret mode (slow, for tests)."""
    backend = jax.default_backend()
    gdn = config.calibration.gdn
    if gdn.impl == "pallas" and backend not in GPU_BACKENDS:
        raise check.ConfigError(
            f"calibration.gdn.impl='pallas' needs a GPU, and JAX's backend here is {backend!r}",
            "use calibration.gdn.impl='auto' (or 'chunked')",
        )
    if gdn.decode_impl == "pallas" and backend == TPU_BACKEND:
        raise check.ConfigError(
            "calibration.gdn.decode_impl='pallas' is a GPU kernel (Triton) and the backend here "
            "is a TPU",
            "use calibration.gdn.decode_impl='xla' (or 'auto')",
        )


def check_alignment_split(config, sizes) -> None:
    """Alignment splits the calibration sequences over the mesh's "data" axis."""
    n, data = config.calibration.num_sequences, sizes["data"]
    if n % data:
        raise check.ConfigError(
            f"calibration.num_sequences={n} does not split over mesh.data={data} devices",
            f"use a multiple of {data}, or a smaller mesh.data",
        )


def check_select(config, arch) -> None:
    s = config.select
    check.one_of(config, "select.policy", select.POLICIES)
    check.one_of(config, "select.split", split.SPLITS)
    if not _scores_nothing(s):
        check.not_eval_split(config, "select.split", "the kept layers would be chosen by")
    check.positive(config, "select.num_sequences", "select.batch_size")
    check.positive(config, "select.parallel_candidates")
    check.at_least(config, "select.seq_len", 2)
    check.fits_positions(config, "select.seq_len", arch)
    if not 0 < s.kept_fraction <= 1:
        raise check.ConfigError(f"select.kept_fraction must be in (0, 1], got {s.kept_fraction}")
    layers = arch.num_hidden_layers
    # the field's default is empty, so its type check cannot say what the items must be
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in s.keep_layers):
        raise check.ConfigError(
            f"select.keep_layers={tuple(s.keep_layers)} must be layer indices (integers)"
        )
    bad = [i for i in s.keep_layers if not 0 <= i < layers]
    if bad:
        raise check.ConfigError(
            f"select.keep_layers={tuple(s.keep_layers)}: {bad} not in [0, {layers})",
            f"the teacher has {layers} layers",
        )
    if len(set(s.keep_layers)) != len(s.keep_layers):
        raise check.ConfigError(f"select.keep_layers={tuple(s.keep_layers)} repeats a layer")


# -------------------------------------------------------------------- statistics I/O


def save_stats(path, st: stats_lib.TeacherStats, tokens_nt) -> None:
    arrays = {
        "distance_lh": st.distance_lh,
        "entropy_lh": st.entropy_lh,
        "valid_nt": st.valid_nt,
        "layers": np.asarray(st.layers, np.int32),
        "tokens_nt": tokens_nt,
    }
    if st.x_lntd is not None:
        arrays.update(
            x_lntd=st.x_lntd, context_lnthd=st.context_lnthd, attn_out_lntd=st.attn_out_lntd
        )
    arrays = hosts.to_host(arrays)  # every process joins the gather; process 0 writes
    with workdir_lib.output_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_stats(path) -> stats_lib.TeacherStats:
    z = np.load(path)
    get = lambda k: jnp.asarray(z[k]) if k in z else None  # noqa: E731
    return stats_lib.TeacherStats(
        distance_lh=get("distance_lh"),
        entropy_lh=get("entropy_lh"),
        x_lntd=get("x_lntd"),
        context_lnthd=get("context_lnthd"),
        attn_out_lntd=get("attn_out_lntd"),
        valid_nt=get("valid_nt"),
        layers=tuple(int(i) for i in z["layers"]),
    )


def collect_stats(config, model_config, params, tokens_nt, mesh=None) -> stats_lib.TeacherStats:
    """`stats.collect` over chunks of sequences_per_batch sequences per device (the last
    chunk padded with invalid rows, dropped again), merged as in the module docstring."""
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415

    c = config.calibration
    tokens = np.asarray(tokens_nt, np.int32)
    n = tokens.shape[0]
    per_device = int(c.sequences_per_batch)
    devices = 1 if mesh is None else mesh.size
    chunk = min(per_device * devices, sharding.pad_to_multiple(n, mesh))
    parts, counts = [], []
    for start in progress(
        range(0, n, chunk), desc="statistics", total=-(-n // chunk), unit="chunk"
    ):
        tok = tokens[start : start + chunk]
        real = tok.shape[0]
        valid = np.ones((chunk, tok.shape[1]), bool)
        valid[real:] = False
        tok = np.concatenate([tok, np.zeros((chunk - real, tok.shape[1]), np.int32)])
        st = stats_lib.collect(
            Transformer(model_config),
            params,
            model_config,
            tok,
            valid_nt=valid,
            block_size=int(c.block_size),
            sequences_per_batch=per_device,
            teacher_pass=str(c.teacher_pass),
            mesh=mesh,
        )
        parts.append(jax.tree.map(lambda a, r=real: np.asarray(a)[:, :r] if a.ndim > 2 else a, st))
        counts.append(float(valid.sum()))
    w = np.asarray(counts) / sum(counts)
    mean = lambda key: sum(wi * np.asarray(getattr(p, key)) for wi, p in zip(w, parts, strict=True))  # noqa: E731
    cat = lambda key: np.concatenate([getattr(p, key) for p in parts], axis=1)  # noqa: E731
    return stats_lib.TeacherStats(
        distance_lh=jnp.asarray(mean("distance_lh"), jnp.float32),
        entropy_lh=jnp.asarray(mean("entropy_lh"), jnp.float32),
        x_lntd=jnp.asarray(cat("x_lntd")),
        context_lnthd=jnp.asarray(cat("context_lnthd")),
        attn_out_lntd=jnp.asarray(cat("attn_out_lntd")),
        valid_nt=jnp.ones(tokens.shape, bool),
        layers=parts[0].layers,
    )


# ----------------------------------------------------------------------------- stages


def statistics_stage(ctx) -> dict:
    """Teacher statistics and teacher-forced activations of every layer -> stats.npz."""
    mcfg, params = ctx.teacher
    tokens = ctx.sequences(ctx.config.calibration)
    st = collect_stats(ctx.config, mcfg, params, tokens, mesh=ctx.mesh)
    os.makedirs(ctx.path(CAL_DIR), exist_ok=True)
    save_stats(ctx.path(_rel(STATS_FILE)), st, tokens)
    d, e = np.asarray(st.distance_lh), np.asarray(st.entropy_lh)
    out = {
        "calibration_tokens": int(np.asarray(st.valid_nt).sum()),
        "mean_distance_per_layer": np.round(d.mean(1), 2).tolist(),
        "mean_entropy_per_layer": np.round(e.mean(1), 3).tolist(),
    }
    ctx.metrics.write("statistics", **out)
    return out


def save_student_dir(path, student_cfg, params, tokenizer=None):
    """Writes a student directory atomically, with `tokenizer`'s files when given (generation
    and export read the tokenizer from there)."""
    from taylorcal_jax.models.student import save_student  # noqa: PLC0415

    with workdir_lib.output_dir(path) as tmp:
        save_student(tmp, student_cfg, params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _write_json(path, obj):
    workdir_lib.write_json(path, obj, default=_plain)


def _plain(x):
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def calibrate_stage(ctx) -> dict:
    """`calibration.strategy` up to phase 1, every layer converted -> init/ + init_report."""
    from taylorcal_jax.models.student import StudentConfig  # noqa: PLC0415

    mcfg, params = ctx.teacher
    st = load_stats(ctx.path(_rel(STATS_FILE)))
    cal = calibration_context(ctx.config, mcfg, ctx.mesh)
    strategy = ctx.config.calibration.strategy
    for _ in progress(range(1), desc=f"calibrate ({strategy})", unit="phase"):
        student, report = select.initial_student(strategy, params, st, cal)
        jax.block_until_ready(student)
    save_student_dir(ctx.path(_rel("init")), StudentConfig(mcfg, (), cal.mixer.config), student)
    _write_json(ctx.path(_rel("init_report.json")), {"strategy": strategy, **report})
    out = {"strategy": strategy, "phase1": select.uses_phase(strategy, "taylor")}
    ctx.metrics.write("calibrate", **out)
    return out


def align_stage(ctx) -> dict:
    """Phase 2 on every layer -> aligned/ + align_report (strategies with phase 2 only)."""
    from taylorcal_jax.models.student import StudentConfig, load_student  # noqa: PLC0415

    strategy = ctx.config.calibration.strategy
    sc, student = load_student(ctx.path(_rel("init")))
    st = load_stats(ctx.path(_rel(STATS_FILE)))
    cal = calibration_context(ctx.config, sc.teacher, ctx.mesh)
    checkpoint_dir = ctx.path(_rel(ALIGN_CHECKPOINT_DIR))

    def log_fn(step, values):
        ctx.metrics.write("align", step=step, **values)

    for _ in progress(range(1), desc=f"align ({cal.align_cfg.steps} steps)", unit="phase"):
        student, report = select.aligned_student(
            strategy, student, st, cal, checkpoint_dir=checkpoint_dir, log_fn=log_fn
        )
        jax.block_until_ready(student)
    save_student_dir(
        ctx.path(_rel("aligned")), StudentConfig(sc.teacher, (), cal.mixer.config), student
    )
    _write_json(ctx.path(_rel("align_report.json")), {"strategy": strategy, **report})
    # The outputs supersede the checkpoints, which hold every mixer four times over.
    workdir_lib.remove(checkpoint_dir)
    a = report["align"]
    out = {
        "steps": cal.align_cfg.steps,
        "loss_before_mean": float(np.mean(a["loss_before"])),
        "loss_after_mean": float(np.mean(a["loss_after"])),
    }
    ctx.metrics.write("align", **out)
    return out


def final_mixers_dir(config, workdir) -> str:
    return os.path.join(workdir, CAL_DIR, "aligned" if uses_align(config) else "init")


def select_layers_stage(ctx) -> dict:
    """keep_full_attention_layers by the policy; writes the calibrated student <workdir>/student."""
    from taylorcal_jax.models.student import StudentConfig, load_student  # noqa: PLC0415

    config = ctx.config
    sc_all, student_all = load_student(final_mixers_dir(config, ctx.workdir))
    mcfg, params = ctx.teacher
    n = mcfg.num_hidden_layers
    mixer = student_mixer(config, mcfg)
    mixers = select.mixers_of(student_all, mixer.name, n)
    s = config.select
    scores = None
    if len(s.keep_layers):
        keep = tuple(sorted(int(i) for i in s.keep_layers))
        policy = "explicit"
    else:
        policy = s.policy
        scoring = select.LayerScoring(
            mcfg,
            mixer,
            params,
            mixers,
            None if policy == "uniform" else ctx.sequences(s),  # uniform scores nothing
            batch_size=int(s.batch_size),
            parallel=int(s.parallel_candidates),
            mesh=ctx.mesh,
        )
        keep, scores = select.choose_layers(policy, float(s.kept_fraction), scoring)
    sc = StudentConfig(mcfg, keep, sc_all.mixer_config, teacher_path=config.teacher.path or None)
    student = select.assemble_student(params, mixers, sc)
    save_student_dir(ctx.path(STUDENT_DIR), sc, student, tokenizer=ctx.corpus.tokenizer)
    out = {"policy": policy, "keep_full_attention_layers": list(keep)}
    if scores is not None:
        out["candidate_ppl"] = [round(float(x), 4) for x in scores]
    _write_json(ctx.path(_rel("select_report.json")), out)
    ctx.metrics.write("select_layers", **out)
    return out


def layer_diagnostics(student_all, st: stats_lib.TeacherStats, ctx) -> dict:
    """Per layer and head, from the final mixers of every layer: the student mixer's
    diagnostics on the calibration inputs (its registry entry; for GDN the half-life in tokens
    at x Wa = 0 and the mean write gate sigmoid(x Wb)), and the teacher-forced mixer loss (MSE
    vs the teacher attention output) per layer."""
    n = ctx.model_config.num_hidden_layers
    layers = tuple(range(n))
    half, beta, loss = [], [], []
    for i in layers:
        g = layer_mixer(student_all, i, ctx.mixer.name)
        diag = ctx.mixer.spec.diagnostics(g, st.x_lntd[st.index(i)], st.valid_nt)
        half.append(diag["half_life"])
        beta.append(diag["write_gate"])
        loss.append(
            float(
                align_lib.layer_loss(
                    g,
                    st.x_lntd[st.index(i)],
                    st.attn_out_lntd[st.index(i)],
                    st.valid_nt,
                    model_config=ctx.model_config,
                    mixer=ctx.mixer,
                )
            )
        )
    return {"half_life": np.stack(half), "write_gate": np.stack(beta), "layer_loss": loss}


def eval_student_stage(ctx) -> dict:
    """Perplexity of the latest student next to the teacher's; per-layer/head report."""
    from taylorcal_jax.eval.perplexity import perplexity  # noqa: PLC0415
    from taylorcal_jax.models.student import load_student  # noqa: PLC0415
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415
    from taylorcal_jax.train.stages import device_description  # noqa: PLC0415

    config = ctx.config
    student_dir = student_dirs.student_dir(config, "eval_student")
    sc, student = load_student(ctx.path(student_dir))
    mcfg, params = ctx.teacher
    seqs = ctx.sequences(config.eval)
    bs = int(config.eval.batch_size)
    t_ppl = perplexity(
        Transformer(mcfg), params, seqs, batch_size=bs, mesh=ctx.mesh, desc="teacher ppl"
    )
    s_model = sc.model(runtime=student_mixer(config, mcfg).runtime)
    s_ppl = perplexity(s_model, student, seqs, batch_size=bs, mesh=ctx.mesh, desc="student ppl")

    st = load_stats(ctx.path(_rel(STATS_FILE)))
    cal = calibration_context(config, mcfg, ctx.mesh)
    _, student_all = load_student(final_mixers_dir(config, ctx.workdir))
    diag = layer_diagnostics(student_all, st, cal)
    with open(ctx.path(_rel("init_report.json"))) as f:
        taylor_rep = json.load(f).get("taylor", {})
    align_m = {}
    if uses_align(config):
        with open(ctx.path(_rel("align_report.json"))) as f:
            align_m = json.load(f)["align"]
    keep = set(sc.keep_full_attention_layers)
    layers = []
    for i in range(mcfg.num_hidden_layers):
        row = {
            "layer": i,
            "converted": i not in keep,
            "teacher_distance": np.asarray(st.distance_lh[st.index(i)]).tolist(),
            "teacher_entropy": np.asarray(st.entropy_lh[st.index(i)]).tolist(),
            "half_life": diag["half_life"][i].tolist(),
            "write_gate": diag["write_gate"][i].tolist(),
            "value_scale": taylor_rep["sigma"][i] if "sigma" in taylor_rep else None,
            "write_gate_target": taylor_rep["beta_target"][i] if taylor_rep else None,
            "align_loss_before": align_m["loss_before"][i] if align_m else None,
            "align_loss_after": align_m["loss_after"][i] if align_m else None,
            "layer_loss": diag["layer_loss"][i],
        }
        layers.append(row)
    report = {
        "strategy": config.calibration.strategy,
        "student": student_dir,  # whose perplexity student_ppl is
        # whose mixers the per-layer rows describe: the calibration's, before any distillation
        "layers_from": os.path.relpath(final_mixers_dir(config, ctx.workdir), ctx.workdir),
        "write_gate_rule": config.calibration.write_gate,
        # the phase-1 parts written into the student (value_scale and write_gate_target are
        # reported for every Taylor strategy, applied only where listed here)
        "phase1_parts": list(
            select.phase1_constants(
                config.calibration.strategy,
                taylor_lib.TaylorConstants.from_config(config.calibration),
            ).phase1_parts
        )
        if taylor_rep
        else [],
        "keep_full_attention_layers": list(sc.keep_full_attention_layers),
        "teacher_ppl": t_ppl["ppl"],
        "student_ppl": s_ppl["ppl"],
        "eval_tokens": s_ppl["tokens"],
        "eval_split": config.eval.split,
        "device": device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": layers,
    }
    with workdir_lib.output_file(ctx.path(REPORT_PNG)) as tmp:
        plot_report(report, tmp)
    _write_json(ctx.path(REPORT_JSON), report)
    out = {
        "strategy": report["strategy"],
        "student": student_dir,
        "keep_full_attention_layers": report["keep_full_attention_layers"],
        "teacher_ppl": t_ppl["ppl"],
        "student_ppl": s_ppl["ppl"],
        "eval_tokens": s_ppl["tokens"],
        "report": ctx.path(REPORT_JSON),
    }
    ctx.metrics.write("eval_student", **out)
    return out


def plot_report(report: dict, path: str) -> None:
    """Four panels: half-life vs teacher distance, write gate, value scale, layer losses."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = report["layers"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for r in rows:
        mark = "o" if r["converted"] else "x"
        ax[0, 0].scatter(r["teacher_distance"], r["half_life"], s=12, marker=mark)
        heads = np.arange(len(r["write_gate"]))
        ax[0, 1].scatter(r["layer"] + 0.8 * heads / max(len(heads), 1), r["write_gate"], s=10)
        if r["value_scale"] is not None:
            ax[1, 0].scatter(r["layer"] + 0.8 * heads / max(len(heads), 1), r["value_scale"], s=10)
    lim = [0.5, max(max(max(r["teacher_distance"]) for r in rows), 1.0)]
    ax[0, 0].plot(lim, lim, "k--", lw=0.8)
    ax[0, 0].set(
        xscale="log",
        yscale="log",
        xlabel="teacher mean attention distance (tokens)",
        ylabel="GDN half-life (tokens)",
        title="decay per head (x: kept layer)",
    )
    ax[0, 1].set(xlabel="layer (heads spread)", ylabel="mean sigmoid(x Wb)", title="write gate")
    parts = report.get("phase1_parts", ())
    title = "value scale (phase 1)"
    if not parts:
        title += ": no phase 1"
    elif "value_scale" not in parts:
        title += ", computed, not applied"
    ax[1, 0].set(xlabel="layer (heads spread)", ylabel="sigma", yscale="log", title=title)
    idx = np.arange(len(rows))
    ax[1, 1].bar(idx - 0.2, [r["layer_loss"] for r in rows], 0.4, label="final mixer")
    if rows[0]["align_loss_before"] is not None:
        ax[1, 1].bar(
            idx + 0.2, [r["align_loss_before"] for r in rows], 0.4, label="before alignment"
        )
    ax[1, 1].set(xlabel="layer", ylabel="teacher-forced MSE", yscale="log", title="layer loss")
    ax[1, 1].legend()
    fig.suptitle(
        f"{report['strategy']}: student ppl {report['student_ppl']:.2f} "
        f"(teacher {report['teacher_ppl']:.2f}), keep {report['keep_full_attention_layers']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _final_mixers_stage(config) -> tuple[str, ...]:
    return ("align",) if uses_align(config) else ("calibrate",)


def _distilled(config) -> tuple[str, ...]:
    """The distillation stage whose student eval_student evaluates, if any."""
    source = student_dirs.source_stage(config, "eval_student")
    return () if source == "select_layers" else (source,)


# Fields that change only speed or memory (results equal up to float rounding).
_SPEED = (
    "calibration.block_size",
    "calibration.sequences_per_batch",
    "calibration.teacher_pass",
    "calibration.gdn.impl",
    "calibration.gdn.chunk_size",
    "calibration.gdn.pallas_residuals",
    "calibration.gdn.decode_impl",
    "calibration.gdn.fused_projections",
)
# What the statistics are computed on.
_STATISTICS = tuple(f"calibration.{k}" for k in ("split", "num_sequences", "seq_len", "seed"))
_TAYLOR = tuple(f"calibration.{f.name}" for f in dataclasses.fields(taylor_lib.TaylorConstants))
_SCORING = tuple(f"select.{k}" for k in ("split", "num_sequences", "seq_len", "seed"))


def _calibrate_ignores(config) -> tuple[str, ...]:
    """What calibrate's result does not depend on: phase 1's constants for a strategy without
    phase 1, phase1_parts for the published one (it writes all four parts)."""
    strategy = config.calibration.strategy
    unused = ()
    if not select.uses_phase(strategy, "taylor"):
        unused = _TAYLOR
    elif not select.configurable_phase1(strategy):
        unused = ("calibration.phase1_parts",)
    return _SPEED + _STATISTICS + ("calibration.align",) + unused


def _scores_nothing(select_cfg) -> bool:
    """Whether select_layers scores no candidates: keep_layers names the layers, or the
    policy (uniform) places them by their index."""
    return bool(len(select_cfg.keep_layers)) or select_cfg.policy == "uniform"


def _select_ignores(config) -> tuple[str, ...]:
    """What select_layers' choice does not depend on: the scoring text when nothing is scored,
    and the policy too when keep_layers names the layers."""
    unused = _SCORING if _scores_nothing(config.select) else ()
    if len(config.select.keep_layers):
        unused = ("select.policy", "select.kept_fraction", *_SCORING)
    return ("select.batch_size", "select.parallel_candidates", *unused)


STAGES = {
    "statistics": Stage(
        name="statistics",
        run=statistics_stage,
        summary="teacher attention statistics and activations on the calibration text",
        reads=_STATISTICS,
        ignores=_SPEED,
        samples=lambda c: (section_sample(c, "calibration"),),
        inputs=lambda config: ("teacher", "corpus"),
        outputs=(_rel(STATS_FILE),),
        checks=(check_calibration,),
    ),
    "calibrate": Stage(
        name="calibrate",
        run=calibrate_stage,
        summary="initialises a GDN mixer for every layer (calibration.strategy, phase 1)",
        reads=("calibration",),
        ignores=_calibrate_ignores,
        inputs=lambda config: ("teacher", "statistics"),
        outputs=(_rel("init"), _rel("init_report.json")),
        checks=(check_calibration,),
        device_checks=(check_gdn_backend,),
    ),
    "align": Stage(
        name="align",
        run=align_stage,
        summary="fits every GDN mixer to its teacher attention layer (phase 2)",
        reads=("calibration.align",),
        ignores=("calibration.align.checkpoint_every",),
        inputs=lambda config: ("statistics", "calibrate"),
        outputs=(_rel("aligned"), _rel("align_report.json")),
        checkpoints=(_rel(ALIGN_CHECKPOINT_DIR),),
        checkpoint_mesh_axes=("layers",),  # its layers are padded to a multiple of the axis
        not_needed=lambda config: (
            "" if uses_align(config) else f"strategy {config.calibration.strategy} has no phase 2"
        ),
        checks=(check_calibration,),
        device_checks=(check_gdn_backend, check_alignment_split),
    ),
    "select_layers": Stage(
        name="select_layers",
        run=select_layers_stage,
        summary="chooses the layers that keep softmax attention; writes the student",
        reads=("select",),
        ignores=_select_ignores,
        # candidates are scored on the select text, unless keep_layers names the layers or the
        # policy (uniform) scores nothing
        samples=lambda c: () if _scores_nothing(c.select) else (section_sample(c, "select"),),
        inputs=lambda config: ("teacher", "corpus", "calibrate", *_final_mixers_stage(config)),
        outputs=(STUDENT_DIR, _rel("select_report.json")),
        checks=(check_calibration, check_select),
        device_checks=(check_gdn_backend,),
    ),
    "eval_student": Stage(
        name="eval_student",
        run=eval_student_stage,
        summary="perplexity of student and teacher; per-layer, per-head report and plot",
        reads=("eval",),
        samples=lambda c: (section_sample(c, "eval"),),
        ignores=("eval.batch_size",),
        inputs=lambda config: (
            "teacher",
            "corpus",
            "statistics",
            "calibrate",
            *_final_mixers_stage(config),
            "select_layers",
            *_distilled(config),
        ),
        outputs=(REPORT_JSON, REPORT_PNG),
        checks=(check_calibration, check_eval),
        device_checks=(check_gdn_backend,),
    ),
}
