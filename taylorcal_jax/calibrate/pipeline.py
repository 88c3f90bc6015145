"""CLI stages of Taylor-Calibrate: statistics, calibrate, align, select_layers, eval_student.

Letters: L layers, H heads, N sequences, T time.

Each stage is `fn(config, workdir, metrics) -> dict` (see taylorcal_jax/main.py) and passes
its results to the next through files under <workdir>/calibration:

    statistics     teacher pass on `calibration.num_sequences` x `calibration.seq_len` tokens
                   of `calibration.split` -> stats.npz (distance, entropy [L, H]; teacher-forced
                   x, context, attention output of every layer)
    calibrate      `calibration.strategy` up to phase 1 for every layer -> init/ (a student
                   directory with every layer converted) + init_report.json
    align          phase 2 for every layer if the strategy has it -> aligned/ + align_report.json
    select_layers  keep_full_attention_layers by `select.policy` / `select.kept_fraction` (or
                   `select.keep_layers`) -> <workdir>/student (the calibrated student)
    eval_student   zero-shot perplexity of student and teacher on the eval set ->
                   calibration_report.json and calibration_report.png (per layer and head:
                   teacher distance and entropy, half-life, write gate, value scale,
                   alignment loss before/after, teacher-forced layer loss)

On the tiny teacher (after its `pretrain` stage):

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny \
      --config.stages='("pretrain","statistics","calibrate","align","select_layers","eval_student")'

Every layer is calibrated (not only the converted ones): phases are teacher-forced per
layer, so this costs L/|converted| more and lets any keep set, and the policies that try
many, reuse the same mixers.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.calibrate import align as align_lib
from taylorcal_jax.calibrate import select
from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.calibrate import taylor as taylor_lib
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.paths import layer_mixer
from taylorcal_jax.utils import sharding

CAL_DIR = "calibration"
STATS_FILE = "stats.npz"
REPORT_JSON = "calibration_report.json"
REPORT_PNG = "calibration_report.png"


# ------------------------------------------------------------------------ config helpers


def student_mixer(config, model_config) -> StudentMixer:
    """The GDN student mixer of section `calibration.gdn`: architecture and runtime options."""
    return StudentMixer.from_options("gdn", model_config, config.calibration.gdn.to_dict())


def alignment_mesh(config):
    c = config.calibration
    return sharding.make_mesh({"layers": int(c.mesh_layers), "data": int(c.mesh_data)})


def context(config, model_config) -> select.CalibrationContext:
    c = config.calibration
    return select.CalibrationContext(
        model_config=model_config,
        mixer=student_mixer(config, model_config),
        consts=taylor_lib.TaylorConstants.from_config(c),
        align_cfg=align_lib.AlignConfig.from_config(c.align),
        mesh=alignment_mesh(config),
        seed=int(c.init_seed),
    )


def validate(config) -> None:
    """Clear errors for the `calibration` and `select` sections."""
    c, s = config.calibration, config.select
    select.check_strategy(c.strategy)
    select.check_policy(s.policy)
    taylor_lib.TaylorConstants.from_config(c)
    align_lib.AlignConfig.from_config(c.align)
    for name in ("num_sequences", "seq_len", "block_size", "sequences_per_batch"):
        if c[name] <= 0:
            raise ValueError(f"calibration.{name} must be positive, got {c[name]}")
    for name in ("num_sequences", "seq_len", "batch_size", "parallel_candidates"):
        if s[name] <= 0:
            raise ValueError(f"select.{name} must be positive, got {s[name]}")
    select.num_kept(100, s.kept_fraction)


def _dir(workdir, *parts):
    return os.path.join(workdir, CAL_DIR, *parts)


def _teacher_and_corpus(config, workdir):
    from taylorcal_jax.train import stages  # noqa: PLC0415

    mcfg, params = stages.load_teacher(config, workdir)
    corpus = stages.build_run_corpus(config, workdir)
    if corpus.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {corpus.vocab_size} tokens, the teacher {mcfg.vocab_size}")
    return mcfg, params, corpus


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_plain)
    os.replace(tmp, path)


def _plain(x):
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _save_student_dir(path, student_cfg, params):
    from taylorcal_jax.models.student import save_student  # noqa: PLC0415

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(tmp, student_cfg, params)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


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
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def load_stats(path) -> stats_lib.TeacherStats:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no statistics at {path}; run the 'statistics' stage first")
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


def collect_stats(config, model_config, params, tokens_nt) -> stats_lib.TeacherStats:
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415

    c = config.calibration
    return stats_lib.collect(
        Transformer(model_config),
        params,
        model_config,
        tokens_nt,
        block_size=int(c.block_size),
        sequences_per_batch=int(c.sequences_per_batch),
        teacher_pass=str(c.teacher_pass),
    )


# ----------------------------------------------------------------------------- stages


def statistics_stage(config, workdir, metrics) -> dict:
    """Teacher statistics and teacher-forced activations of every layer -> stats.npz."""
    validate(config)
    mcfg, params, corpus = _teacher_and_corpus(config, workdir)
    c = config.calibration
    tokens = corpus.sample(c.split, int(c.num_sequences), int(c.seq_len), int(c.seed))
    st = collect_stats(config, mcfg, params, tokens)
    os.makedirs(_dir(workdir), exist_ok=True)
    save_stats(_dir(workdir, STATS_FILE), st, tokens)
    d, e = np.asarray(st.distance_lh), np.asarray(st.entropy_lh)
    out = {
        "calibration_tokens": int(np.asarray(st.valid_nt).sum()),
        "mean_distance_per_layer": np.round(d.mean(1), 2).tolist(),
        "mean_entropy_per_layer": np.round(e.mean(1), 3).tolist(),
    }
    metrics.write("statistics", **out)
    return out


def calibrate_stage(config, workdir, metrics) -> dict:
    """`calibration.strategy` up to phase 1, every layer converted -> init/ + init_report."""
    from taylorcal_jax.models.student import StudentConfig  # noqa: PLC0415

    validate(config)
    mcfg, params, _ = _teacher_and_corpus(config, workdir)
    st = load_stats(_dir(workdir, STATS_FILE))
    ctx = context(config, mcfg)
    strategy = config.calibration.strategy
    student, report = select.initial_student(strategy, params, st, ctx)
    _save_student_dir(_dir(workdir, "init"), StudentConfig(mcfg, (), ctx.mixer.config), student)
    _write_json(_dir(workdir, "init_report.json"), {"strategy": strategy, **report})
    out = {"strategy": strategy, "phase1": select.uses_phase(strategy, "taylor")}
    metrics.write("calibrate", **out)
    return out


def align_stage(config, workdir, metrics) -> dict:
    """Phase 2 on every layer (if the strategy has it) -> aligned/ + align_report."""
    from taylorcal_jax.models.student import StudentConfig, load_student  # noqa: PLC0415

    validate(config)
    strategy = config.calibration.strategy
    sc, student = load_student(_dir(workdir, "init"))
    st = load_stats(_dir(workdir, STATS_FILE))
    ctx = context(config, sc.teacher)
    if not select.uses_phase(strategy, "align"):
        _write_json(_dir(workdir, "align_report.json"), {"strategy": strategy, "aligned": False})
        return {"skipped": f"strategy {strategy} has no phase 2"}
    student, report = select.aligned_student(strategy, student, st, ctx)
    _save_student_dir(
        _dir(workdir, "aligned"), StudentConfig(sc.teacher, (), ctx.mixer.config), student
    )
    _write_json(
        _dir(workdir, "align_report.json"), {"strategy": strategy, "aligned": True, **report}
    )
    a = report["align"]
    out = {
        "steps": ctx.align_cfg.steps,
        "loss_before_mean": float(np.mean(a["loss_before"])),
        "loss_after_mean": float(np.mean(a["loss_after"])),
    }
    metrics.write("align", **out)
    return out


def final_mixers_dir(config, workdir) -> str:
    aligned = select.uses_phase(config.calibration.strategy, "align")
    path = _dir(workdir, "aligned" if aligned else "init")
    if not os.path.exists(path):
        stage = "align" if aligned else "calibrate"
        raise FileNotFoundError(f"no mixers at {path}; run the '{stage}' stage first")
    return path


def selection_sequences(config, corpus):
    s = config.select
    return corpus.sample(s.split, int(s.num_sequences), int(s.seq_len), int(s.seed))


def select_layers_stage(config, workdir, metrics) -> dict:
    """keep_full_attention_layers by the policy; writes the calibrated student <workdir>/student."""
    from taylorcal_jax.models.student import StudentConfig, load_student  # noqa: PLC0415

    validate(config)
    sc_all, student_all = load_student(final_mixers_dir(config, workdir))
    mcfg, params, corpus = _teacher_and_corpus(config, workdir)
    n = mcfg.num_hidden_layers
    mixers = select.mixers_of(student_all, sc_all.mixer_name, n)
    s = config.select
    scores = None
    if len(s.keep_layers):
        keep = tuple(sorted(int(i) for i in s.keep_layers))
        policy = "explicit"
    else:
        policy = s.policy
        keep, scores = select.choose_layers(
            policy,
            float(s.kept_fraction),
            mcfg,
            sc_all.student_mixer(student_mixer(config, mcfg).runtime),
            params,
            mixers,
            selection_sequences(config, corpus),
            batch_size=int(s.batch_size),
            parallel=int(s.parallel_candidates),
        )
    sc = StudentConfig(mcfg, keep, sc_all.mixer_config, teacher_path=config.teacher.path or None)
    student = select.assemble_student(params, mixers, sc)
    _save_student_dir(os.path.join(workdir, "student"), sc, student)
    out = {"policy": policy, "keep_full_attention_layers": list(keep)}
    if scores is not None:
        out["candidate_ppl"] = [round(float(x), 4) for x in scores]
    _write_json(_dir(workdir, "select_report.json"), out)
    metrics.write("select_layers", **out)
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


def eval_student_stage(config, workdir, metrics) -> dict:
    """Zero-shot perplexity of the student next to the teacher's; per-layer/head report."""
    from taylorcal_jax.eval.perplexity import perplexity  # noqa: PLC0415
    from taylorcal_jax.models.student import load_student  # noqa: PLC0415
    from taylorcal_jax.models.teacher import Transformer  # noqa: PLC0415
    from taylorcal_jax.train import stages  # noqa: PLC0415

    validate(config)
    sc, student = load_student(os.path.join(workdir, "student"))
    mcfg, params, corpus = _teacher_and_corpus(config, workdir)
    seqs = stages.eval_sequences(config, corpus)
    bs = int(config.eval.batch_size)
    t_ppl = perplexity(Transformer(mcfg), params, seqs, batch_size=bs, desc="teacher ppl")
    runtime = student_mixer(config, mcfg).runtime
    s_ppl = perplexity(sc.model(runtime=runtime), student, seqs, batch_size=bs, desc="student ppl")

    st = load_stats(_dir(workdir, STATS_FILE))
    ctx = context(config, mcfg)
    _, student_all = load_student(final_mixers_dir(config, workdir))
    diag = layer_diagnostics(student_all, st, ctx)
    init_rep = json.load(open(_dir(workdir, "init_report.json")))
    align_path = _dir(workdir, "align_report.json")
    align_rep = json.load(open(align_path)) if os.path.exists(align_path) else {}
    taylor_rep = init_rep.get("taylor", {})
    align_m = align_rep.get("align", {})
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
        "write_gate_rule": config.calibration.write_gate,
        "keep_full_attention_layers": list(sc.keep_full_attention_layers),
        "teacher_ppl": t_ppl["ppl"],
        "student_ppl": s_ppl["ppl"],
        "eval_tokens": s_ppl["tokens"],
        "eval_split": config.eval.split,
        "device": stages.device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": layers,
    }
    _write_json(os.path.join(workdir, REPORT_JSON), report)
    plot_report(report, os.path.join(workdir, REPORT_PNG))
    out = {
        "strategy": report["strategy"],
        "keep_full_attention_layers": report["keep_full_attention_layers"],
        "teacher_ppl": t_ppl["ppl"],
        "student_ppl": s_ppl["ppl"],
        "eval_tokens": s_ppl["tokens"],
        "report": os.path.join(workdir, REPORT_JSON),
    }
    metrics.write("eval_student", **out)
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
    ax[1, 0].set(
        xlabel="layer (heads spread)", ylabel="sigma", yscale="log", title="value scale (phase 1)"
    )
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


STAGES = {
    "statistics": statistics_stage,
    "calibrate": calibrate_stage,
    "align": align_stage,
    "select_layers": select_layers_stage,
    "eval_student": eval_student_stage,
}
