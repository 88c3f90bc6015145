"""Recovery experiment: training tokens each init needs to reach target perplexities.

For each init (calibration.strategy) the pipeline converts the same layers (select.policy
and kept_fraction; 75% converted, uniform, by default) and trains the student with
distillation stage 1 then stage 2 (taylorcal_jax/train/distill_stages.py), every init on the
same batches in the same order and the same token budgets (the config's `distill` section,
settable with --config.distill.*). Perplexity on the eval set (the config's `eval` section:
SmolLM2's is 16 x 2048 tokens of the test split) is measured at tokens 0 and every
`eval_every_tokens` of each stage; a curve's tokens count stage 1's then stage 2's.
`--nostage1` skips stage 1: stage 2 starts from the init itself (what stage 1 does to an
init's lead), and the result's `budgets` hold stage 2's alone.

    python launch/recovery.py --config=configs/smollm2_135m.py --workdir=/tmp/recovery \
        --tag=smollm2_135m --config.progress=False \
        --config.distill.layers.train_tokens=4000000 --config.distill.kl.train_tokens=8000000

On the tiny smoke teacher (pretrained first in the workdir), in a few minutes on a CPU:

    python launch/recovery.py --config=configs/tiny.py:smoke --workdir=/tmp/recovery_smoke \
        --tag=smoke_cpu --out=/tmp/recovery_out

Targets: 2.0x and 1.5x the teacher's perplexity, and the final perplexity of `copy`.
Tokens to a target: the first crossing of the curve, interpolated linearly in log(ppl)
between the two evaluations around it (0 when the first evaluation is already there, null
when the curve never gets there). Ratios: tokens of `copy` (and of `zero_gate`) over tokens
of the init, per target.

Matched ratios (`matched`), how an init's advantage changes along training: at each of the
init's evaluations, the tokens copy (and zero_gate) needs to reach the same perplexity over the
init's tokens there (the second panel of the plot).

Projection, for a target a run has not reached: the straight line through its last
PROJECTION_POINTS evaluations in log(tokens), log(ppl) (least squares; a power law
ppl = a tokens^b, b < 0), extended to the target, and not earlier than the last evaluation
(where the run was measured still above the target). It assumes the curve keeps its recent
slope; a curve that flattens further (a floor) needs more tokens than projected. Projected
ratios use the measured tokens where a run reached the target and the projected ones
elsewhere, and are reported apart from the measured ones (`projection`).

Stage-2 throughput: tokens per second between consecutive loss lines of metrics.jsonl with
no evaluation between them (median; compilation and evaluations excluded), and model FLOPs
utilisation MFU = 6 N tokens/s / peak, with N the student's parameter count and the peak
dense bf16 FLOP/s of the device (PEAK_BF16_FLOPS, by device kind; none on a CPU). The
teacher's forward pass on the same tokens, 2 N_teacher per token, is counted separately
(`mfu_with_teacher`), and `mfu_with_attention` adds the causal softmax attention's two
products (q k^T, p v; not weights, so not in N) of the student's kept layers (forward and
backward, 3x) and of every teacher layer (forward): the model FLOPs of the whole step
(`attention_flops_per_token`). It is taken from each init's run as it finishes (the latest
finished init's), so a run stopped later keeps it.

Each init runs in its own workdir <workdir>/<init> (teacher and corpus cache shared), on
taylorcal_jax's runner: rerunning the command skips finished stages and resumes an
interrupted one from its checkpoint, so the experiment continues where a cut call stopped.
Progress: one line per evaluation; the result files are rewritten after every evaluation
(watching each init's metrics.jsonl), "complete" false until the end.

Inits run in separate calls (same config, same machine: the text is the machine's) are joined
into one result by `--merge=a.json,b.json --tag=...`, which checks that they share teacher,
text, eval windows, budgets and device, and recomputes the targets and ratios.

Writes <out>/recovery_<tag>.{json,md,png}: JSON keys teacher, teacher_ppl, device, date,
command, git, source_digest, xla_flags, targets {name: ppl}, runs [{init, curve [[tokens,
ppl], ...], tokens_to_target {target: tokens or null}}], ratios, throughput, budgets, text,
complete.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from taylorcal_jax.eval import training_curves
from taylorcal_jax.utils.metrics import read_metrics

FLAGS = flags.FLAGS
INITS = ("copy", "zero_gate", "align_only", "taylor_calibrate")
TARGET_FACTORS = (2.0, 1.5)
PROJECTION_POINTS = 3  # evaluations of a curve's tail that its projection fits
PROJECTION_METHOD = (
    f"power law through the last {PROJECTION_POINTS} evaluations (log-log least squares), "
    "extended to the target"
)
BASELINES = ("copy", "zero_gate")  # the inits every other init's tokens are compared with
PAPER_LOW_RATIO = 4.9  # the paper's fewest-tokens claim (copy / Taylor-Calibrate), drawn
# Dense bf16 peak FLOP/s (no sparsity) by jax device_kind.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}
DISTILL_STAGES = ("distill_layers", "distill")


def define_flags() -> None:
    """The command-line flags (defined by the script only, so that tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
    flags.DEFINE_string("workdir", None, "Workdir: one sub-workdir per init, resumable.")
    flags.DEFINE_list("inits", list(INITS), "Initialisation strategies, in the order run.")
    flags.DEFINE_string("tag", None, "Result files: recovery_<tag>.{json,md,png}.")
    flags.DEFINE_float("kept_fraction", 0.25, "Share of layers that keep softmax attention.")
    flags.DEFINE_bool(
        "stage1",
        True,
        "Train stage 1 (distill_layers) before stage 2; --nostage1: stage 2 alone, from the "
        "init itself (the ablation of what stage 1 does to an init's lead).",
    )
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")
    flags.DEFINE_string(
        "rerender",
        None,
        "A recovery_<tag>.json: add its projection and matched ratios and rewrite its "
        ".json/.md/.png in --out (no training; --config, --workdir and --tag are then not "
        "needed).",
    )
    flags.DEFINE_list(
        "merge",
        None,
        "recovery_*.json files of one experiment whose inits ran apart: their runs joined into "
        "<out>/recovery_<tag>.{json,md,png} (no training; needs --tag).",
    )


# ------------------------------------------------------------------------- pure parts


def curve_from_metrics(rows: list[dict], stages=DISTILL_STAGES) -> list[list[float]]:
    """[[tokens, ppl], ...] of one init from its metrics.jsonl rows: the evaluation rows of
    stage 1, then stage 2's with stage 1's final tokens added (stage 2's first point, the
    same student as stage 1's last, is dropped). Only the `stages` of this schedule count,
    each by its latest run (metrics.jsonl keeps the rows of every run in the workdir,
    training_curves.latest_run); a resumed run may log a point twice: the last row of each
    (stage, tokens) wins."""
    points = {stage: {} for stage in DISTILL_STAGES}
    for stage in stages:
        for r in training_curves.latest_run([r for r in rows if r.get("stage") == stage]):
            if "step" in r and "eval_ppl" in r:
                points[stage][int(r["tokens"])] = float(r["eval_ppl"])
    first = sorted(points["distill_layers"].items())
    offset = first[-1][0] if first else 0
    second = [(offset + t, p) for t, p in sorted(points["distill"].items()) if t > 0 or not first]
    return [[t, p] for t, p in first + second]


def tokens_to_target(curve, target: float) -> float | None:
    """Training tokens at which the curve first reaches `target` (module docstring).
    Non-finite evaluations (a diverged run) are left out: they reach nothing, and
    interpolating through them gave NaN."""
    curve = [(t, p) for t, p in curve if math.isfinite(p)]
    if not curve:
        return None
    if curve[0][1] <= target:
        return float(curve[0][0])
    for (t0, p0), (t1, p1) in zip(curve, curve[1:], strict=False):
        if p1 <= target:
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return float(t0 + frac * (t1 - t0))
    return None


def project_tokens(curve, target: float, points: int = PROJECTION_POINTS) -> float | None:
    """Tokens at which the power law through the curve's last `points` evaluations (tokens >
    0) reaches `target` (module docstring), and not before the last evaluation, where the
    curve was measured still above it; None with fewer than 2 points or no descent."""
    tail = [(math.log(t), math.log(p)) for t, p in curve if t > 0][-points:]
    if len(tail) < 2:
        return None
    n = len(tail)
    mx, my = sum(x for x, _ in tail) / n, sum(y for _, y in tail) / n
    sxx = sum((x - mx) ** 2 for x, _ in tail)
    slope = sum((x - mx) * (y - my) for x, y in tail) / sxx if sxx else 0.0
    if slope >= 0:
        return None
    return max(math.exp(mx + (math.log(target) - my) / slope), float(curve[-1][0]))


def projection(runs: list[dict], targets: dict) -> dict:
    """{"method", "points", "tokens_to_target" {init: {target: tokens}}, "projected" {init:
    [targets projected]}, "ratios" {baseline: {init: {target: ratio}}}}: measured tokens where
    a run reached a target, projected ones (`project_tokens`) elsewhere."""
    tokens, projected = {}, {}
    for r in runs:
        row, guessed = {}, []
        for name, value in targets.items():
            measured = r["tokens_to_target"].get(name)
            if measured is None:
                measured = project_tokens(r["curve"], value)
                guessed += [] if measured is None else [name]
            row[name] = measured
        tokens[r["init"]], projected[r["init"]] = row, guessed
    as_runs = [{"init": init, "tokens_to_target": row} for init, row in tokens.items()]
    return {
        "method": PROJECTION_METHOD,
        "points": PROJECTION_POINTS,
        "tokens_to_target": tokens,
        "projected": projected,
        "ratios": {b: ratios(as_runs, b) for b in BASELINES},
    }


def targets_of(teacher_ppl: float, runs: dict) -> dict:
    """{name: ppl}: 2.0x and 1.5x the teacher's, and copy's final ppl once its run is done."""
    out = {f"{f:g}x_teacher": f * teacher_ppl for f in TARGET_FACTORS}
    copy = runs.get("copy")
    if copy and copy.get("done") and copy["curve"]:
        out["copy_final"] = copy["curve"][-1][1]
    return out


def ratios(runs: list[dict], baseline: str) -> dict:
    """{init: {target: tokens(baseline) / tokens(init)}} where both are known and positive."""
    base = next((r for r in runs if r["init"] == baseline), None)
    if base is None:
        return {}
    out = {}
    for r in runs:
        row = {}
        for name, tokens in r["tokens_to_target"].items():
            b = base["tokens_to_target"].get(name)
            row[name] = b / tokens if b and tokens else None
        out[r["init"]] = row
    return out


def matched_ratios(runs: list[dict], baseline: str) -> dict:
    """{init: [[tokens, ppl, ratio or None], ...]} for every init but `baseline`: at each of
    the init's evaluations after token 0, the tokens the baseline's curve needs to reach the
    same perplexity (`tokens_to_target`) over the init's tokens there; None where the
    baseline never gets there. How the advantage of an init changes along training."""
    base = next((r for r in runs if r["init"] == baseline), None)
    if base is None:
        return {}
    out = {}
    for r in runs:
        if r["init"] == baseline:
            continue
        rows = []
        for t, p in r["curve"]:
            if t > 0:
                b = tokens_to_target(base["curve"], p)
                rows.append([t, p, b / t if b is not None else None])  # 0.0: at the start
        out[r["init"]] = rows
    return out


def step_throughput(rows: list[dict]) -> float | None:
    """Median tokens/s of stage 2 between consecutive loss lines with no evaluation (nor a
    restart) between them, in the latest run of the stage (training_curves.latest_run)."""
    rates, prev = [], None
    for r in training_curves.latest_run([r for r in rows if r.get("stage") == "distill"]):
        if "step" not in r:
            continue
        if "loss" not in r:  # an evaluation or a resume: the next interval is not clean
            prev = None
            continue
        if prev is not None and r["train_seconds"] > prev["train_seconds"]:
            dt = r["train_seconds"] - prev["train_seconds"]
            rates.append((r["tokens"] - prev["tokens"]) / dt)
        prev = r
    return statistics.median(rates) if rates else None


def attention_flops_per_token(cfg, mixers, seq_len: int) -> float:
    """Forward FLOPs per token of the causal softmax attention's two products, q k^T and p v,
    which 6 N (weights only) leaves out: 4 H Dh k per softmax layer, k the mean number of keys a
    query of a seq_len sequence attends, min(t + 1, window) averaged over t < seq_len (the
    layer's sliding window, or none). `cfg` a ModelConfig; `mixers` per layer "attention" or a
    mixer's name (None: every layer attention, the teacher)."""
    import numpy as np

    from taylorcal_jax.models.paths import ATTENTION

    positions = np.arange(1, seq_len + 1)
    total = 0.0
    for i, window in enumerate(cfg.sliding_windows):
        if mixers is None or mixers[i] == ATTENTION:
            keys = positions if window is None else np.minimum(positions, window)
            total += 4 * cfg.num_attention_heads * cfg.head_dim * float(keys.mean())
    return total


def throughput(
    tokens_per_second,
    student_params: int,
    teacher_params: int,
    kind: str,
    student_attention: float = 0.0,
    teacher_attention: float = 0.0,
) -> dict:
    """{tokens_per_second, flops_per_token, mfu, mfu_with_teacher, mfu_with_attention, peak}
    (module docstring); student_attention and teacher_attention: `attention_flops_per_token`
    of each model (0: not known)."""
    peak = PEAK_BF16_FLOPS.get(kind)
    train, teacher = 6 * student_params, 2 * teacher_params
    # the student's attention is differentiated (forward + 2 x backward), the teacher's is not
    attention = 3 * student_attention + teacher_attention
    out = {
        "tokens_per_second": tokens_per_second,
        "student_params": student_params,
        "teacher_params": teacher_params,
        "train_flops_per_token": train,
        "teacher_flops_per_token": teacher,
        "attention_flops_per_token": attention,
        "device_kind": kind,
        "peak_bf16_flops": peak,
        "mfu": None,
        "mfu_with_teacher": None,
        "mfu_with_attention": None,
    }
    if peak and tokens_per_second:
        out["mfu"] = train * tokens_per_second / peak
        out["mfu_with_teacher"] = (train + teacher) * tokens_per_second / peak
        if attention:
            out["mfu_with_attention"] = (train + teacher + attention) * tokens_per_second / peak
    return out


def analysis(teacher_ppl: float, runs: dict) -> dict:
    """{"targets", "runs", "ratios", "matched", "projection"} of a result from its curves,
    `runs` {init: {"init", "curve", "done"}} in the order reported."""
    targets = targets_of(teacher_ppl, runs)
    out_runs = [
        {
            "init": r["init"],
            "curve": r["curve"],
            "tokens_to_target": {n: tokens_to_target(r["curve"], v) for n, v in targets.items()},
            "complete": r["done"],
        }
        for r in runs.values()
    ]
    return {
        "targets": targets,
        "runs": out_runs,
        "ratios": {b: ratios(out_runs, b) for b in BASELINES},
        "matched": {b: matched_ratios(out_runs, b) for b in BASELINES},
        "projection": projection(out_runs, targets),
    }


# What result files must share for their runs to be compared: the same teacher, eval windows
# of the same text, budgets and kept layers, on the same kind of device.
# results_io.invocation()'s code fields, recorded by each run and kept per part by a merge
PROVENANCE_KEYS = ("git", "source_digest", "settings_digest", "xla_flags")
MERGE_KEYS = ("teacher_ppl", "kept_fraction", "eval", "budgets", "device")


def check_shared(results: list[dict], keys, action: str) -> None:
    """ValueError ("cannot <action>: ...") unless the results agree on `keys` and on their
    text's corpus and eval digests."""
    first = results[0]
    for r in results[1:]:
        for key in keys:
            if r[key] != first[key]:
                raise ValueError(f"cannot {action}: {key} differs ({first[key]!r} vs {r[key]!r})")
        for key in ("corpus_digest", "eval_digest"):
            if r["text"][key] != first["text"][key]:
                raise ValueError(f"cannot {action}: text {key} differs")


def read_results(paths) -> list[dict]:
    """The recovery result files (JSON) at `paths`, in order; ValueError (one line) for a
    missing or unreadable one."""
    results = []
    for path in paths:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the result file {path}: {e}") from e
    return results


def merge(results: list[dict], command: str, tag: str) -> dict:
    """One result from the runs of several result files of the same experiment, each init
    from one file (e.g. inits run in separate calls): their `MERGE_KEYS` and text digests
    must agree. Targets (copy's final ppl included), tokens to them, ratios and projection
    are recomputed from the curves; `parts` keeps each file's command, date, inits,
    throughput and provenance; the merged throughput is the latest file's (by date), as in
    one run it is the latest finished init's."""
    check_shared(results, MERGE_KEYS, "merge")
    first = results[0]
    inits = [run["init"] for r in results for run in r["runs"]]
    if len(set(inits)) != len(inits):
        raise ValueError(f"cannot merge: an init appears twice in {inits}")
    runs = {
        run["init"]: {"init": run["init"], "curve": run["curve"], "done": run["complete"]}
        for r in results
        for run in r["runs"]
    }
    parts = [
        {
            "command": r["command"],
            "date": r["date"],
            "inits": [run["init"] for run in r["runs"]],
            "throughput": r.get("throughput"),
            **{k: r[k] for k in PROVENANCE_KEYS if k in r},
        }
        for r in results
    ]
    return {
        **first,
        "teacher_name": tag,
        "date": max(r["date"] for r in results),
        "command": command,
        "parts": parts,
        **analysis(first["teacher_ppl"], runs),
        "throughput": max(results, key=lambda r: r["date"]).get("throughput"),
        "complete": all(r.get("complete") for r in results),
    }


def report_header(title: str, result: dict) -> list[str]:
    """The first lines of a recovery report (here and in recovery_schedules.py): title,
    teacher, device, date and command."""
    return [
        f"{title}, teacher {result['teacher']} (ppl {result['teacher_ppl']:.3f}), "
        f"{result['device']}, {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    names = list(result["targets"])
    lines = report_header("Recovery after distillation", result)
    parts = result.get("parts", [])
    if parts:
        lines += ["Runs joined from:", ""]
        lines += [f"- {', '.join(p['inits'])}: {p['date']}, `{p['command']}`" for p in parts]
        lines += [""]
    lines += [
        f"Budgets: {json.dumps(result['budgets'])}",
        "",
    ]
    if not result.get("complete"):
        lines += ["**Incomplete**: the experiment stopped before its last evaluation.", ""]
    lines += [
        "Targets: " + ", ".join(f"{n} = {result['targets'][n]:.3f}" for n in names),
        "",
        "| init | ppl at 0 | final ppl (tokens) | "
        + " | ".join(f"tokens to {n}" for n in names)
        + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in result["runs"]:
        c = r["curve"]
        cells = [_tokens(r["tokens_to_target"].get(n)) for n in names]
        first = f"{c[0][1]:.3f}" if c else ""
        last = f"{c[-1][1]:.3f} ({c[-1][0]:,.0f})" if c else ""
        lines.append(f"| {r['init']} | {first} | {last} | " + " | ".join(cells) + " |")
    for base, table in result["ratios"].items():
        lines += _ratio_table(
            f"Tokens of {base} / tokens of the init (blank: a target one of the two never "
            "reached, or reached at 0 tokens):",
            table,
            names,
        )
    lines += _matched_lines(result.get("matched", {}).get("copy"))
    lines += _projection_lines(result.get("projection"), names)
    th = result.get("throughput") or {}
    if th.get("tokens_per_second"):
        mfu = "n/a (no peak for this device)" if th["mfu"] is None else f"{th['mfu']:.1%}"
        lines += [
            "",
            f"Stage 2 ({th['init']}): {th['tokens_per_second']:,.0f} tokens/s, MFU {mfu} "
            f"(6 N, N = {th['student_params']:,} student params"
            + (
                ""
                if th["mfu"] is None
                else f"; with the teacher's forward {th['mfu_with_teacher']:.1%}"
            )
            + (
                ""
                if th.get("mfu_with_attention") is None
                else f"; and with both models' causal attention {th['mfu_with_attention']:.1%}"
            )
            + ").",
        ]
    return "\n".join(lines) + "\n"


def _matched_lines(matched: dict | None) -> list[str]:
    """Copy's tokens to each init's perplexity along the init's curve, as a table."""
    if not matched:
        return []
    lines = ["", "At equal perplexity along each init's curve: tokens of copy / tokens of the "
             "init (blank: copy never got there):", ""]  # fmt: skip
    inits = list(matched)
    lines += ["| tokens | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits)]
    by_tokens = {}
    for init, rows in matched.items():
        for t, p, ratio in rows:
            by_tokens.setdefault(t, {})[init] = (p, ratio)
    for t in sorted(by_tokens):
        cells = []
        for init in inits:
            p, ratio = by_tokens[t].get(init, (None, None))
            cells.append(
                "" if p is None else f"{p:.2f}" + ("" if ratio is None else f": {ratio:.2f}x")
            )
        lines.append(f"| {t:,.0f} | " + " | ".join(cells) + " |")
    return lines


def _projection_lines(proj: dict | None, names: list[str]) -> list[str]:
    """The projection's tables, when some run has a projected target."""
    if not proj or not any(proj["projected"].values()):
        return []
    lines = ["", f"Projected ({proj['method']}; * marks a projected figure, the others are "
             "measured):", ""]  # fmt: skip
    lines += ["| init | " + " | ".join(f"tokens to {n}" for n in names) + " |"]
    lines += ["|---|" + "---|" * len(names)]
    for init, row in proj["tokens_to_target"].items():
        star = proj["projected"][init]
        cells = [_tokens(row.get(n)) + ("*" if n in star else "") for n in names]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    for base, table in proj["ratios"].items():
        lines += _ratio_table(f"Projected tokens of {base} / tokens of the init:", table, names)
    return lines


def _ratio_table(title: str, table: dict, names: list[str]) -> list[str]:
    """A titled markdown table of {init: {target: ratio or None}}, one column per target."""
    lines = ["", title, "", "| init | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for init, row in table.items():
        cells = ["" if row.get(n) is None else f"{row[n]:.2f}" for n in names]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return lines


def _tokens(t) -> str:
    return "not reached" if t is None else f"{t:,.0f}"


def plot(result: dict, path: str) -> None:
    """ppl against training tokens (log-log), one line per init, the targets dashed, each
    projected crossing dotted from the run's last evaluation to an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matched = (result.get("matched") or {}).get("copy") or {}
    ratio_pts = {i: [(t, r) for t, _, r in rows if r is not None] for i, rows in matched.items()}
    ratio_pts = {i: pts for i, pts in ratio_pts.items() if pts}  # inits copy ever matched
    if ratio_pts:
        fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(12, 5))
    else:
        fig, ax = plt.subplots(figsize=(7, 5))
    proj = result.get("projection") or {"projected": {}}
    for r in result["runs"]:
        pts = [(max(t, 1.0), p) for t, p in r["curve"]]
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=r["init"])
        for name in proj["projected"].get(r["init"], []):  # dotted: the projection's reach
            end = (proj["tokens_to_target"][r["init"]][name], result["targets"][name])
            ax.plot(*zip(pts[-1], end, strict=True), ":", color=line.get_color(), lw=1)
            ax.plot(*end, "x", color=line.get_color(), ms=5)
    for name, value in result["targets"].items():
        ax.axhline(value, ls="--", lw=0.8, color="gray")
        ax.text(0.01, value, name, fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
    ax.axhline(result["teacher_ppl"], color="k", lw=1, label="teacher")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training tokens ("
        + ("stage 1 + stage 2" if "layers" in result["budgets"] else "stage 2 alone")
        + "; 0 at 1)",
        ylabel="perplexity",
        title=f"recovery, teacher {result.get('teacher_name', '')}",
    )
    ax.legend(fontsize=8)
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    if ratio_pts:
        for init, pts in ratio_pts.items():
            ax_ratio.plot(*zip(*pts, strict=True), "o-", ms=3, label=init, color=colors.get(init))
        ax_ratio.axhline(1.0, color="k", lw=1)
        ax_ratio.axhline(PAPER_LOW_RATIO, ls="--", lw=0.8, color="gray")
        ax_ratio.text(
            0.01,
            PAPER_LOW_RATIO,
            f"{PAPER_LOW_RATIO}x, the paper's low end",
            fontsize=7,
            va="bottom",
            transform=ax_ratio.get_yaxis_transform(),
        )
        ax_ratio.set(
            xscale="log",
            xlabel="training tokens of the init",
            ylabel="tokens of copy / tokens of the init, at equal perplexity",
            title="token advantage over copy along training",
        )
        ax_ratio.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_outputs(result: dict, out_dir: str, tag: str) -> dict:
    """<out_dir>/recovery_<tag>.{json,md,png}, each written whole under a temporary name and
    renamed (a cut run leaves the previous complete file)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"recovery_{tag}")
    paths = {k: f"{base}.{k}" for k in ("json", "md", "png")}

    def text(path, body):
        with open(path, "w") as f:
            f.write(body)

    writers = {
        "json": lambda p: text(p, json.dumps(result, indent=1)),
        "md": lambda p: text(p, markdown(result)),
        "png": lambda p: plot(result, p),
    }
    for kind, write in writers.items():
        write(paths[kind] + ".partial")
        os.replace(paths[kind] + ".partial", paths[kind])
    return paths


# ------------------------------------------------------------------------- experiment


def init_config(config, init: str, kept_fraction: float, teacher_dir: str, stage1: bool = True):
    """The config of one init's run (its own workdir; the teacher checkpoint shared). Without
    stage 1, stage 2 starts from the calibrated student itself."""
    c = config.copy_and_resolve_references()
    c.teacher.path = teacher_dir
    c.calibration.strategy = init
    c.select.policy = "uniform"
    c.select.kept_fraction = kept_fraction
    c.select.keep_layers = ()
    distill = DISTILL_STAGES if stage1 else DISTILL_STAGES[1:]
    c.stages = ("statistics", "calibrate", "align", "select_layers", *distill)
    return c


def _read_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return read_metrics(path)


class Experiment:
    """The result being built: per-init curves read from their metrics.jsonl."""

    def __init__(self, base: dict, inits, workdirs: dict, out: str, tag: str, stages):
        self.base, self.inits, self.workdirs = base, list(inits), workdirs
        self.stages = tuple(stages)  # the distillation stages of this schedule
        self.out, self.tag = out, tag
        self.done: set[str] = set()
        self.seen: dict[str, int] = {}
        self.throughput = None
        self.lock = threading.Lock()

    def result(self, teacher_ppl: float, complete: bool = False) -> dict:
        runs = {}
        for init in self.inits:
            rows = _read_rows(self.workdirs[init])
            runs[init] = {"init": init, "curve": curve_from_metrics(rows, self.stages),
                          "done": init in self.done}  # fmt: skip
        return {
            **self.base,
            "teacher_ppl": teacher_ppl,
            **analysis(teacher_ppl, runs),
            "throughput": self.throughput,
            "complete": complete,
        }

    def report(self, teacher_ppl: float, complete: bool = False) -> None:
        """Prints new evaluations and rewrites the result files when there are any."""
        with self.lock:
            fresh = False
            for init in self.inits:
                curve = curve_from_metrics(_read_rows(self.workdirs[init]), self.stages)
                for t, p in curve[self.seen.get(init, 0) :]:
                    print(f"[{time.strftime('%H:%M:%S')}] {init}: {t:,.0f} tokens, ppl {p:.3f}",
                          flush=True)  # fmt: skip
                    fresh = True
                self.seen[init] = len(curve)
            if fresh or complete:
                write_outputs(self.result(teacher_ppl, complete), self.out, self.tag)


def run_experiment(
    config, workdir: str, inits, kept_fraction: float, out: str, tag: str, stage1: bool = True
):
    import jax
    import results_io  # launch/
    import run_inputs  # launch/

    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.student import load_student
    from taylorcal_jax.models.teacher import Transformer
    from taylorcal_jax.run import inputs, runner, validate
    from taylorcal_jax.run.context import RunContext
    from taylorcal_jax.stage_registry import STAGES
    from taylorcal_jax.train import pretrain as pretrain_lib
    from taylorcal_jax.train import stages

    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    if not config.teacher.path:  # a teacher of our own, pretrained once in the workdir
        # every problem found before the pretraining too: each init's run as if it pretrained
        for init in inits:
            cfg = init_config(config, init, kept_fraction, "", stage1)
            cfg.stages = ("pretrain", *cfg.stages)
            validate.validate(cfg, STAGES, os.path.join(workdir, init))
        own = config.copy_and_resolve_references()
        own.stages = ("pretrain",)
        runner.run(own, workdir, STAGES, command=command)
        config.teacher.path = inputs.teacher_dir(own, workdir)
    teacher_source = run_inputs.resolve_teacher(config, workdir)
    configs = {i: init_config(config, i, kept_fraction, config.teacher.path, stage1) for i in inits}
    for init, cfg in configs.items():  # every problem found before any training
        validate.validate(cfg, STAGES, os.path.join(workdir, init))
    workdirs = {}
    for init in inits:
        wd = os.path.join(workdir, init)
        os.makedirs(wd, exist_ok=True)
        data = os.path.join(wd, "data")
        if not os.path.lexists(data):  # one corpus cache for every init
            os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(workdir, "data")), data)
        workdirs[init] = wd
    ctx = RunContext(config, workdir)
    eval_seqs = ctx.sequences(config.eval)
    mcfg, teacher_params = ctx.teacher
    teacher_ppl = perplexity(
        Transformer(mcfg), teacher_params, eval_seqs, batch_size=int(config.eval.batch_size),
        mesh=ctx.mesh, desc="teacher ppl",
    )["ppl"]  # fmt: skip
    print(f"teacher ppl {teacher_ppl:.3f}", flush=True)
    base = {
        "teacher": teacher_source["path"],
        "teacher_name": tag,
        "device": stages.device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "jax_version": jax.__version__,
        **{k: v for k, v in results_io.invocation().items() if k in PROVENANCE_KEYS},
        "kept_fraction": kept_fraction,
        "eval": {k: config.eval[k] for k in ("split", "num_sequences", "seq_len")},
        "budgets": {
            s: {
                k: config.distill[s][k]
                for k in ("train_tokens", "batch_size", "seq_len", "eval_every_tokens")
            }
            for s in (("layers", "kl") if stage1 else ("kl",))
        },  # fmt: skip
        "text": run_inputs.text_record(config, ctx.corpus, eval_seqs),
    }
    exp = Experiment(base, inits, workdirs, out, tag, DISTILL_STAGES[0 if stage1 else 1 :])
    stop = threading.Event()

    def watch():
        while not stop.wait(5.0):
            exp.report(teacher_ppl)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log = results_io.progress_log()

    def init_throughput(init: str) -> dict:
        # from each init as it finishes, so that a run stopped later still records one
        sc, student = load_student(os.path.join(workdirs[init], "student_distilled"))
        seq_len = config.distill.kl.seq_len
        th = throughput(
            step_throughput(_read_rows(workdirs[init])),
            pretrain_lib.count_params(student),
            pretrain_lib.count_params(teacher_params),
            jax.devices()[0].device_kind,
            student_attention=attention_flops_per_token(sc.teacher, sc.mixers, seq_len),
            teacher_attention=attention_flops_per_token(sc.teacher, None, seq_len),
        )
        return {**th, "init": init}

    try:
        for init in inits:
            log(f"{init}: start")
            runner.run(configs[init], workdirs[init], STAGES, command=command)
            exp.throughput = init_throughput(init)
            exp.done.add(init)
            exp.report(teacher_ppl)
    finally:
        stop.set()
        watcher.join()
    exp.report(teacher_ppl, complete=True)
    return exp.result(teacher_ppl, complete=True)


def rerender(path: str, out: str) -> dict:
    """The result file at `path` with its projection and matched ratios added (measured
    figures unchanged), rewritten as <out>/recovery_<tag>.{json,md,png}."""
    import results_io  # launch/

    with open(path) as f:
        result = json.load(f)
    if not all("tokens_to_target" in run for run in result.get("runs") or [{}]):
        raise ValueError(
            f"{path} is not a recovery result (its runs have no tokens_to_target; a "
            "recovery_schedules comparison is made again from its --results)"
        )
    result["projection"] = {
        **projection(result["runs"], result["targets"]),
        "command": results_io.command_line(),
    }
    result["matched"] = {b: matched_ratios(result["runs"], b) for b in BASELINES}
    tag = os.path.basename(path).removeprefix("recovery_").removesuffix(".json")
    write_outputs(result, out, tag)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.rerender:
        try:
            print(markdown(rerender(FLAGS.rerender, FLAGS.out)))
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        return
    if FLAGS.merge:
        import results_io  # launch/

        if FLAGS.tag is None:
            raise app.UsageError("--merge needs --tag")
        try:
            result = merge(read_results(FLAGS.merge), results_io.command_line(), FLAGS.tag)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        write_outputs(result, FLAGS.out, FLAGS.tag)
        print(markdown(result))
        return
    missing = [name for name in ("config", "workdir", "tag") if FLAGS[name].value is None]
    if missing:
        raise app.UsageError("give " + ", ".join(f"--{m}" for m in missing))
    from taylorcal_jax.calibrate import select
    from taylorcal_jax.utils import progress

    for init in FLAGS.inits:
        select.check_strategy(init)
    config = FLAGS.config
    progress.set_enabled(config.progress)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from taylorcal_jax.errors import user_errors_as_lines

    with user_errors_as_lines():  # a bad setting or a missing teacher: one line, as the CLI's
        result = run_experiment(
            config, FLAGS.workdir, FLAGS.inits, FLAGS.kept_fraction, FLAGS.out, FLAGS.tag,
            FLAGS.stage1,
        )  # fmt: skip
    print(markdown(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    define_flags()
    app.run(main)
