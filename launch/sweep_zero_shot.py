"""Zero-shot sweep: strategies x policies x kept fraction on one teacher (docs/benchmarks.md §5).

    python launch/sweep_zero_shot.py --config=configs/tiny.py --workdir=/tmp/tiny1 \
        --teacher_name=tiny_cpu

On one GPU, teacher pretraining and the sweep in one command (results land in $OUT):

    python -m taylorcal_jax.main --config=configs/gpu_teacher.py --workdir=/tmp/g \
        --config.progress=False && \
    python launch/sweep_zero_shot.py --config=configs/gpu_teacher.py --workdir=/tmp/g \
        --teacher_name=gpu_teacher --fractions=0.25,0.5 \
        --write_gate_rules=release,mean_direction --config.progress=False --out=$OUT

A real pretrained teacher (a .gguf teacher.path is converted once into <workdir>/gguf):

    python launch/sweep_zero_shot.py --config=configs/smollm2_135m.py --workdir=/tmp/smollm2 \
        --teacher_name=smollm2_135m --config.progress=False

Phase-1 ablation (`--phase1_ablation`): each Taylor strategy also runs with one phase-1 part
alone, labelled "<strategy>[<part>]", and with every part but one, "<strategy>[-<part>]"
(calibration.phase1_parts; parts decay, write_gate, value_scale, output_gate; the parts not
taken keep the `copy` init), scored on `--ablation_policies` (uniform and ar by default, which
cost no layer scoring per run), e.g. which part pulls alignment into a worse place:

    python launch/sweep_zero_shot.py --config=configs/smollm2_135m.py --workdir=/tmp/smollm2 \
        --teacher_name=smollm2_135m_phase1_ablation --strategies=align_only,taylor_calibrate \
        --policies=uniform --phase1_ablation --config.progress=False

Teacher: `config.teacher.path`, else <workdir>/teacher (the `pretrain` stage). Evaluation
set: the config's `eval` section; calibration and selection data: `calibration` / `select`.
For every strategy the GDN params of *every* layer are computed once (phases are
teacher-forced per layer), then every (policy, kept fraction) keep set is assembled and all
of them are scored together by the one model vmapped over keep flags
(`select.score_keep_masks`, tested equal to the student model). `ar` scores do not depend on
the strategy (computed once); `ga_s2` ranks layers with each strategy's own init.

Writes launch/results/zero_shot_<teacher_name>.{json,csv,md,png}, after every strategy (so an
interrupted sweep keeps what it finished; "complete" is false until the end), and prints each
step with the seconds elapsed. JSON fields: teacher, teacher_source (a .gguf file's
fingerprint), teacher_ppl, eval_tokens, text (source glob, split, documents and tokens per
split, corpus and eval digests: launch/run_inputs.py), device, date, command, rows (policy,
kept_fraction, strategy, keep_full_attention_layers, ppl), per_strategy (init seconds, write
gate, phase-1 parts, per-layer alignment loss before/after phase 2, ga_s2 candidate ppl) and
the settings used.

Taylor strategies run once per `--write_gate_rules` entry; the non-default rule is labelled
"<strategy>+<rule>" (e.g. taylor_calibrate+mean_direction, our improvement, reported as such).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined by the script only, so that tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
    flags.DEFINE_string(
        "workdir", None, "Workdir: the teacher (unless teacher.path) and the corpus cache."
    )
    flags.DEFINE_string("teacher_name", None, "Name in the result files.")
    flags.DEFINE_list(
        "strategies",
        "copy,zero_gate,small_gate,taylor_init,align_only,taylor_calibrate,taylor_calibrate_published",
        "Initialisation strategies.",
    )
    flags.DEFINE_list("policies", "uniform,ar,ga_s2", "Layer policies.")
    flags.DEFINE_list("fractions", "0.25", "Kept fractions of attention layers.")
    flags.DEFINE_list(
        "write_gate_rules", "release", "Write-gate rules for the Taylor strategies (first = plain)."
    )
    flags.DEFINE_bool(
        "phase1_ablation",
        False,
        "Also run each Taylor strategy with one phase-1 part alone and with all parts but one.",
    )
    flags.DEFINE_list(
        "phase1_variants",
        [],
        "Extra runs of each Taylor strategy with these phase-1 parts, '+'-joined, e.g. "
        "decay+write_gate (labelled <strategy>[decay+write_gate]).",
    )
    flags.DEFINE_list(
        "ablation_policies",
        "uniform,ar",
        "Layer policies of the phase-1 ablation runs (ga_s2 scores every layer once per run).",
    )
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")
    flags.mark_flags_as_required(["config", "workdir"])


def ablation_label(strategy: str, parts: tuple[str, ...]) -> str:
    """ "<strategy>[<part>]": only that part from phase 1; "<strategy>[-<part>]": all but it;
    "<strategy>[<part>+<part>]": those parts."""
    from taylorcal_jax.calibrate.taylor import PHASE1_PARTS

    left_out = set(PHASE1_PARTS) - set(parts)
    if len(parts) > 1 and len(left_out) == 1:
        return f"{strategy}[-{left_out.pop()}]"
    return f"{strategy}[{'+'.join(parts)}]"


def variants(
    strategy: str, rules, phase1_ablation: bool, phase1_variants=()
) -> list[tuple[str, dict]]:
    """(label, calibration overrides) of each run of `strategy`: one per write-gate rule for
    the Taylor strategies (the first rule unlabelled), plus with `phase1_ablation` each phase-1
    part alone and all parts but one, plus one run per '+'-joined part set of
    `phase1_variants` (under the first rule); one plain run otherwise."""
    from taylorcal_jax.calibrate import select
    from taylorcal_jax.calibrate.taylor import PHASE1_PARTS

    if not select.configurable_phase1(strategy):  # no phase 1, or the published one
        return [(strategy, {})]
    out = [
        (strategy if i == 0 else f"{strategy}+{rule}", {"write_gate": rule})
        for i, rule in enumerate(rules)
    ]
    if phase1_ablation:
        singles = [(p,) for p in PHASE1_PARTS]
        all_but = [tuple(q for q in PHASE1_PARTS if q != p) for p in PHASE1_PARTS]
        for parts in singles + all_but:
            label = ablation_label(strategy, parts)
            out.append((label, {"write_gate": rules[0], "phase1_parts": parts}))
    for spec in phase1_variants:
        parts = tuple(spec.split("+"))
        out.append(
            (ablation_label(strategy, parts), {"write_gate": rules[0], "phase1_parts": parts})
        )
    return out


def sweep(
    config,
    workdir,
    strategies,
    policies,
    fractions,
    rules,
    *,
    phase1_ablation=False,
    phase1_variants=(),
    ablation_policies=("uniform", "ar"),
    on_update=None,
):
    """Returns the result dict (see module docstring); calls on_update(result so far) after
    every strategy variant, so that an interrupted sweep keeps the rows it finished. The
    phase-1 ablation runs are scored on `ablation_policies` only."""
    import jax
    import numpy as np
    import results_io  # launch/
    import run_inputs  # launch/

    from taylorcal_jax.calibrate import pipeline, select
    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.teacher import Transformer
    from taylorcal_jax.run import validate
    from taylorcal_jax.run.context import RunContext
    from taylorcal_jax.stage_registry import STAGES

    for s in strategies:
        select.check_strategy(s)
    for p in (*policies, *ablation_policies):
        select.check_policy(p)
    from taylorcal_jax.calibrate.taylor import PHASE1_PARTS

    for spec in phase1_variants:
        unknown = set(spec.split("+")) - set(PHASE1_PARTS)
        if unknown:
            raise ValueError(f"--phase1_variants {spec!r}: {sorted(unknown)} not in {PHASE1_PARTS}")
    if phase1_ablation and not any(select.configurable_phase1(s) for s in strategies):
        raise ValueError(
            "--phase1_ablation needs a Taylor strategy (taylor_init, taylor_calibrate)"
        )
    validate.validate(config, STAGES, workdir)
    t0 = time.perf_counter()
    log = results_io.progress_log(t0)

    teacher_source = run_inputs.resolve_teacher(config, workdir)
    run_ctx = RunContext(config, workdir)
    mcfg, params = run_ctx.teacher
    corpus = run_ctx.corpus
    n = mcfg.num_hidden_layers
    log(f"teacher ({n} layers) and text ready")
    c = config.calibration
    cal_tokens = run_ctx.sequences(c)
    st = pipeline.collect_stats(config, mcfg, params, cal_tokens, run_ctx.mesh)
    jax.block_until_ready(st)
    stats_seconds = time.perf_counter() - t0
    log(f"statistics on {cal_tokens.shape} calibration tokens")
    eval_seqs = run_ctx.sequences(config.eval)
    sel_seqs = run_ctx.sequences(config.select)
    bs = int(config.eval.batch_size)
    teacher = perplexity(Transformer(mcfg), params, eval_seqs, batch_size=bs, desc="teacher")
    log(f"teacher ppl {teacher['ppl']:.3f} on {teacher['tokens']} tokens")
    par = int(config.select.parallel_candidates)
    sel_bs = int(config.select.batch_size)
    result = {
        "teacher": teacher_source["path"] or os.path.join(workdir, "teacher"),
        "teacher_source": teacher_source,
        "teacher_ppl": teacher["ppl"],
        "eval_tokens": teacher["tokens"],
        "eval_split": config.eval.split,
        "eval_seq_len": int(config.eval.seq_len),
        "text": run_inputs.text_record(config, corpus, eval_seqs),
        **results_io.provenance(),  # device, jax_version, date, command, git, digests
        "calibration": {
            "tokens": int(np.asarray(st.valid_nt).sum()),
            "num_sequences": int(c.num_sequences),
            "seq_len": int(c.seq_len),
            "split": c.split,
            "align_steps": int(c.align.steps),
            "statistics_seconds": round(stats_seconds, 2),
        },
        "select": {
            "num_sequences": int(config.select.num_sequences),
            "seq_len": int(config.select.seq_len),
            "split": config.select.split,
        },
        "ar_candidate_ppl": None,
        "per_strategy": {},
        "complete": False,
        "total_seconds": None,
        "rows": [],
    }

    ar_scores = None
    rows, extras = result["rows"], result["per_strategy"]
    for strategy in strategies:
        for label, overrides in variants(strategy, rules, phase1_ablation, phase1_variants):
            cfg = config.copy_and_resolve_references()
            cfg.calibration.update(overrides)
            ctx = pipeline.calibration_context(cfg, mcfg, run_ctx.mesh)
            t1 = time.perf_counter()
            mixers, report = select.mixers_for_all_layers(strategy, params, st, ctx)
            jax.block_until_ready(mixers)
            init_seconds = time.perf_counter() - t1
            log(f"{label}: mixers of all {n} layers in {init_seconds:.1f} s")
            keeps = []
            ga_scores = None

            scoring = select.LayerScoring(
                mcfg, ctx.mixer, params, mixers, sel_seqs, batch_size=sel_bs, parallel=par
            )

            for policy in ablation_policies if "phase1_parts" in overrides else policies:
                for frac in fractions:
                    if policy == "uniform":
                        keep = select.uniform_layers(n, frac)
                    elif policy == "ar":  # independent of the strategy: scored once
                        if ar_scores is None:
                            ar_scores = select.policy_scores("ar", scoring)
                            result["ar_candidate_ppl"] = np.asarray(ar_scores).tolist()
                            log(f"ar: {n} candidates scored")
                        keep = select.keep_from_scores("ar", ar_scores, frac)
                    else:
                        if ga_scores is None:
                            ga_scores = select.policy_scores("ga_s2", scoring)
                            log(f"{label}: ga_s2, {n} candidates scored")
                        keep = select.keep_from_scores("ga_s2", ga_scores, frac)
                    keeps.append((policy, frac, keep))
            union = select.union_params(params, mixers, ctx.mixer.name)
            masks = np.stack([select.keep_mask(k, n) for _, _, k in keeps])
            ppl = select.score_keep_masks(
                mcfg,
                ctx.mixer,
                union,
                masks,
                eval_seqs,
                batch_size=bs,
                parallel=par,
                desc=f"eval {label}",
            )
            for (policy, frac, keep), value in zip(keeps, ppl, strict=True):
                rows.append(
                    {
                        "policy": policy,
                        "kept_fraction": frac,
                        "strategy": label,
                        "keep_full_attention_layers": list(keep),
                        "ppl": float(value),
                    }
                )
            extra = {
                "init_seconds": round(init_seconds, 2),
                "write_gate": ctx.consts.write_gate,
                "phase1_parts": list(select.phase1_constants(strategy, ctx.consts).phase1_parts),
            }
            if "align" in report:
                extra["align_loss_before"] = np.asarray(report["align"]["loss_before"]).tolist()
                extra["align_loss_after"] = np.asarray(report["align"]["loss_after"]).tolist()
            if ga_scores is not None:
                extra["ga_s2_candidate_ppl"] = np.asarray(ga_scores).tolist()
            extras[label] = extra
            log(
                f"{label}: "
                + ", ".join(
                    f"{r['policy']}@{r['kept_fraction']}={r['ppl']:.3f}"
                    for r in rows
                    if r["strategy"] == label
                )
            )
            result["total_seconds"] = round(time.perf_counter() - t0, 1)
            if on_update is not None:
                on_update(result)
    result["complete"] = True
    return result


def write_outputs(result: dict, out_dir: str, name: str) -> dict:
    """JSON + CSV + markdown table + PNG plot; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"zero_shot_{name}")
    paths = {k: f"{base}.{k}" for k in ("json", "csv", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    fields = ["policy", "kept_fraction", "strategy", "keep_full_attention_layers", "ppl"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")  # e.g. release_run
        w.writeheader()
        for r in result["rows"]:
            w.writerow(
                {
                    **r,
                    "keep_full_attention_layers": " ".join(
                        map(str, r["keep_full_attention_layers"])
                    ),
                }
            )
    with open(paths["md"], "w") as f:
        f.write(markdown_table(result))
    plot(result, paths["png"])
    return paths


def _columns(result):
    cols = []
    for r in result["rows"]:
        key = (r["policy"], r["kept_fraction"])
        if key not in cols:
            cols.append(key)
    return cols


def markdown_table(result: dict) -> str:
    cols = _columns(result)
    strategies = list(dict.fromkeys(r["strategy"] for r in result["rows"]))
    ppl = {(r["strategy"], r["policy"], r["kept_fraction"]): r for r in result["rows"]}
    head = "| strategy | " + " | ".join(f"{p} @ {f:.0%} kept" for p, f in cols) + " |"
    lines = [
        f"Zero-shot perplexity, teacher {result['teacher']} (teacher ppl "
        f"{result['teacher_ppl']:.3f}), {result['eval_tokens']} eval tokens "
        f"({result['eval_split']}, seq {result['eval_seq_len']}), {result['device']}, "
        f"{result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        *[
            f"{k.replace('_', ' ').capitalize()}: {result[k]}"
            for k in ("teacher_origin", "notes")
            if result.get(k)
        ],
        *_text_lines(result),
        "",
        head,
        "|" + "---|" * (len(cols) + 1),
        "| teacher | " + " | ".join(f"{result['teacher_ppl']:.3f}" for _ in cols) + " |",
    ]
    for s in strategies:
        cells = []
        for p, f in cols:
            r = ppl.get((s, p, f))
            cells.append("" if r is None else f"{r['ppl']:.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += _alignment_lines(result)
    lines += _release_run_lines(result)
    lines += ["", "Kept layers:", ""]
    seen = {}
    for r in result["rows"]:
        seen.setdefault((r["policy"], r["kept_fraction"]), {})[r["strategy"]] = r[
            "keep_full_attention_layers"
        ]
    for (p, f), by_s in seen.items():
        uniq = {tuple(v) for v in by_s.values()}
        if len(uniq) == 1:
            lines.append(f"- {p} @ {f:.0%}: {list(uniq.pop())}")
        else:
            lines.append(f"- {p} @ {f:.0%}: " + "; ".join(f"{s} {v}" for s, v in by_s.items()))
    return "\n".join(lines) + "\n"


def _release_run_lines(result: dict) -> list[str]:
    """Where and when each `reference_release` row ran (launch/reference_release.py adds them
    in runs of their own, maybe on another device than the sweep's)."""
    imports = result.get("reference_release", {}).get("imports", [])
    runs = [r for r in imports if r.get("device")]
    if not runs:
        return []
    lines = ["", "The reference release's rows, each from its own run:", ""]
    for r in runs:
        lines.append(
            f"- {r['policy']}: {r['device']}, {r['date']}, git {r['git']}: `{r['command']}`"
        )
    return lines


def _text_lines(result: dict) -> list[str]:
    text = result.get("text")
    if not text:
        return []
    lines = [
        f"Text: `{text['source']}` (first {text['max_documents']} documents, hashed split "
        f"seed {text['split_seed']}; documents {text['documents']}; tokens {text['tokens']}); "
        f"corpus digest {text['corpus_digest']}, eval digest {text['eval_digest']}."
    ]
    if not result.get("complete", True):
        lines.append("**Incomplete**: the sweep stopped before its last strategy.")
    return lines


def _alignment_lines(result: dict) -> list[str]:
    """Phase-2 loss per strategy (teacher-forced MSE, mean and max over layers), if any."""
    aligned = {k: v for k, v in result["per_strategy"].items() if "align_loss_after" in v}
    if not aligned:
        return []
    lines = [
        "",
        "Alignment loss (teacher-forced MSE of every layer's mixer; mean / max over layers):",
        "",
        "| strategy | phase-1 parts | before | after | after, max |",
        "|---|---|---|---|---|",
    ]
    for label, v in aligned.items():
        before, after = v["align_loss_before"], v["align_loss_after"]
        parts = " ".join(v.get("phase1_parts", [])) if "taylor" in label else "-"
        lines.append(
            f"| {label} | {parts} | {sum(before) / len(before):.4g} | "
            f"{sum(after) / len(after):.4g} | {max(after):.4g} |"
        )
    return lines


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = _columns(result)
    strategies = list(dict.fromkeys(r["strategy"] for r in result["rows"]))
    ppl = {(r["strategy"], r["policy"], r["kept_fraction"]): r["ppl"] for r in result["rows"]}
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.4 * len(cols) * len(strategies))), 5))
    width = 0.8 / len(strategies)
    x = np.arange(len(cols))
    for j, s in enumerate(strategies):
        vals = [ppl.get((s, p, f), np.nan) for p, f in cols]
        ax.bar(x + (j - (len(strategies) - 1) / 2) * width, vals, width, label=s)
    ax.axhline(result["teacher_ppl"], color="k", ls="--", lw=1, label="teacher")
    ax.set_xticks(x, [f"{p}\n{f:.0%} kept" for p, f in cols])
    ax.set_yscale("log")
    ax.set_ylabel("zero-shot perplexity (log)")
    ax.set_title(f"zero-shot students of {result.get('teacher_name', result['teacher'])}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    workdir = FLAGS.workdir
    from taylorcal_jax.utils import progress

    progress.set_enabled(config.progress)
    fractions = [float(f) for f in FLAGS.fractions]
    name = FLAGS.teacher_name or os.path.basename((config.teacher.path or workdir).rstrip("/"))

    def write(result):
        result["teacher_name"] = name
        return write_outputs(result, FLAGS.out, name)

    from taylorcal_jax.errors import user_errors_as_lines

    with user_errors_as_lines():  # a bad setting or a missing teacher: one line, as the CLI's
        result = sweep(
            config,
            workdir,
            FLAGS.strategies,
            FLAGS.policies,
            fractions,
            FLAGS.write_gate_rules,
            phase1_ablation=FLAGS.phase1_ablation,
            phase1_variants=FLAGS.phase1_variants,
            ablation_policies=FLAGS.ablation_policies,
            on_update=write,
        )
    paths = write(result)
    print(markdown_table(result))
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    define_flags()
    app.run(main)
