"""What a training schedule does to each init's recovery: recovery results of the same
experiment under different distillation schedules (stage 1 then stage 2, or stage 2 alone:
`launch/recovery.py --nostage1`), set side by side.

    python launch/recovery_schedules.py --tag=smollm2_135m_h100_stage1 \
        --results=launch/results/recovery_smollm2_135m_h100_9m_all4.json,\
launch/results/recovery_smollm2_135m_h100_kl8m_all4.json

The results must share teacher, eval windows and text digests, kept fraction and device kind
(`recovery.MERGE_KEYS` but the budgets, which make the schedules), and each must name a
different schedule. A schedule's name comes from its budgets: "stage 1 + stage 2" where the
budgets hold stage 1 ("layers"), "stage 2 alone" otherwise; a curve's tokens count every
stage's.

Targets: 2.0x and 1.5x the teacher's perplexity (copy's final perplexity differs between
schedules and is left out). Per init, schedule and target: the tokens to the target, measured
(`recovery.tokens_to_target`) or, where the curve stops short of it, projected
(`recovery.project_tokens`, marked). Two ratios per target:

- `stage1_saving` {init: {target: tokens of the schedule without stage 1 / tokens with it}}:
  what stage 1 saves that init (> 1: stage 1 pays for its tokens);
- `copy_ratio` {schedule: {init: {target: tokens of copy / tokens of the init}}}: the init's
  lead over naive conversion within each schedule, the quantity the paper's 4.9x-9.2x claim
  is about;
- `full_vs_naive` {init: {target: tokens of copy with stage 2 alone / tokens of the init with
  stage 1 + stage 2}}: the whole pipeline against naive conversion trained end to end only.

Writes <out>/recovery_schedules_<tag>.{json,md,png}; the plot draws perplexity (log) against
tokens, one colour per init, solid with stage 1 and dashed without, the targets dotted, and
zooms in on the targets in its right panel.
"""

from __future__ import annotations

import json
import os
import sys

import recovery  # launch/
from absl import app, flags

FLAGS = flags.FLAGS
WITH_STAGE1, STAGE2_ALONE = "stage 1 + stage 2", "stage 2 alone"
SHARED_KEYS = tuple(k for k in recovery.MERGE_KEYS if k != "budgets")


def define_flags() -> None:
    flags.DEFINE_list("results", None, "recovery result files (JSON), one per schedule")
    flags.DEFINE_string("tag", None, "name of the comparison: recovery_schedules_<tag>.*")
    flags.DEFINE_string("out", "launch/results", "where the result files go")


def schedule_of(result: dict) -> str:
    """The schedule a recovery result ran: stage 1 then 2, or stage 2 alone."""
    return WITH_STAGE1 if "layers" in result["budgets"] else STAGE2_ALONE


def check_comparable(results: list[dict]) -> None:
    """ValueError unless the results share everything but the schedule, one each."""
    recovery.check_shared(results, SHARED_KEYS, "compare")
    schedules = [schedule_of(r) for r in results]
    if len(set(schedules)) != len(schedules):
        raise ValueError(f"cannot compare: a schedule appears twice in {schedules}")


def tokens_table(results: list[dict], targets: dict) -> dict:
    """{schedule: {init: {target: [tokens or None, projected?]}}}: measured tokens where a curve
    reaches a target, projected ones elsewhere (recovery.projection)."""
    table = {}
    for r in results:
        runs = [
            {
                "init": run["init"],
                "curve": run["curve"],
                "tokens_to_target": {
                    n: recovery.tokens_to_target(run["curve"], v) for n, v in targets.items()
                },
            }
            for run in r["runs"]
        ]
        proj = recovery.projection(runs, targets)
        table[schedule_of(r)] = {
            init: {n: [t, n in proj["projected"][init]] for n, t in row.items()}
            for init, row in proj["tokens_to_target"].items()
        }
    return table


def _ratio(num, den):
    return num / den if num and den else None


def compare(results: list[dict], invocation: dict, tag: str) -> dict:
    """The comparison result (module docstring) of recovery results of one experiment;
    invocation: results_io.invocation() of this process (its command and code)."""
    check_comparable(results)
    first = results[0]
    targets = {f"{f:g}x_teacher": f * first["teacher_ppl"] for f in recovery.TARGET_FACTORS}
    table = tokens_table(results, targets)
    inits = [run["init"] for run in first["runs"]]
    saving = {}
    if WITH_STAGE1 in table and STAGE2_ALONE in table:
        with1, alone = table[WITH_STAGE1], table[STAGE2_ALONE]
        saving = {
            i: {n: _ratio(alone[i][n][0], with1[i][n][0]) for n in targets}
            for i in inits
            if i in with1 and i in alone
        }
    copy_ratio = {
        s: {i: {n: _ratio(rows["copy"][n][0], rows[i][n][0]) for n in targets} for i in rows}
        for s, rows in table.items()
        if "copy" in rows
    }
    naive = table.get(STAGE2_ALONE, {}).get("copy")
    full_vs_naive = {}
    if naive and WITH_STAGE1 in table:
        full_vs_naive = {
            i: {n: _ratio(naive[n][0], row[n][0]) for n in targets}
            for i, row in table[WITH_STAGE1].items()
        }
    return {
        "tag": tag,
        "teacher": first["teacher"],
        "teacher_ppl": first["teacher_ppl"],
        "device": first["device"],
        "date": max(r["date"] for r in results),
        "command": invocation["command"],
        # the code of this comparison; each source keeps its own run's
        **{k: invocation[k] for k in recovery.PROVENANCE_KEYS if k in invocation},
        "text": first["text"],
        "eval": first["eval"],
        "kept_fraction": first["kept_fraction"],
        "sources": [
            {
                "schedule": schedule_of(r),
                "teacher_name": r["teacher_name"],
                "date": r["date"],
                "command": r["command"],
                **{k: r[k] for k in recovery.PROVENANCE_KEYS if k in r},
                "budgets": r["budgets"],
                "complete": r.get("complete"),
            }
            for r in results
        ],
        "targets": targets,
        "runs": [
            {"init": run["init"], "schedule": schedule_of(r), "curve": run["curve"]}
            for r in results
            for run in r["runs"]
        ],
        "tokens_to_target": table,
        "stage1_saving": saving,
        "copy_ratio": copy_ratio,
        "full_vs_naive": full_vs_naive,
        "projection_method": recovery.PROJECTION_METHOD,
    }


def _cell(entry) -> str:
    tokens, projected = entry
    return "never" if tokens is None else f"{tokens / 1e6:.2f}M" + ("*" if projected else "")


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def markdown(result: dict) -> str:
    names = list(result["targets"])
    lines = recovery.report_header("Recovery under different schedules", result)
    lines += ["Sources:", ""]
    lines += [
        f"- {s['schedule']} ({s['teacher_name']}, {s['date']}, budgets "
        f"{json.dumps(s['budgets'])}): `{s['command']}`"
        for s in result["sources"]
    ]
    lines += [
        "",
        "Targets: " + ", ".join(f"{n} = {v:.3f}" for n, v in result["targets"].items()),
        "",
        "Tokens to each target (* projected: " + result["projection_method"] + "):",
        "",
        "| init | schedule | " + " | ".join(names) + " | final ppl (tokens) |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for run in result["runs"]:
        row = result["tokens_to_target"][run["schedule"]][run["init"]]
        t, p = run["curve"][-1]
        lines.append(
            f"| {run['init']} | {run['schedule']} | "
            + " | ".join(_cell(row[n]) for n in names)
            + f" | {p:.3f} ({t:,.0f}) |"
        )
    tokens = result["tokens_to_target"]

    def projected(schedule, init, name):  # (a ratio's operand) a projected token count
        return tokens.get(schedule, {}).get(init, {}).get(name, [None, False])[1]

    if result["stage1_saving"]:
        lines += _ratio_lines(
            "What stage 1 saves: tokens of stage 2 alone / tokens of stage 1 + stage 2:",
            result["stage1_saving"],
            names,
            lambda i, n: projected(STAGE2_ALONE, i, n) or projected(WITH_STAGE1, i, n),
        )
    for schedule, table in result["copy_ratio"].items():
        lines += _ratio_lines(
            f"Tokens of copy / tokens of the init, {schedule}:",
            table,
            names,
            lambda i, n, s=schedule: projected(s, "copy", n) or projected(s, i, n),
        )
    if result["full_vs_naive"]:
        lines += _ratio_lines(
            "Tokens of copy with stage 2 alone / tokens of the init with stage 1 + stage 2:",
            result["full_vs_naive"],
            names,
            lambda i, n: projected(STAGE2_ALONE, "copy", n) or projected(WITH_STAGE1, i, n),
        )
    return "\n".join(lines) + "\n"


def _ratio_lines(title: str, table: dict, names: list[str], projected) -> list[str]:
    """A ratio table; `*` on a ratio whose numerator or denominator is projected
    (projected(init, target))."""
    lines = ["", title, "", "| init | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for init, row in table.items():
        cells = [_x(row[n]) + ("*" if row[n] is not None and projected(init, n) else "")
                 for n in names]  # fmt: skip
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: str) -> None:
    """ppl (log) against tokens (linear): a colour per init, a line style per schedule; the
    right panel zooms in on the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = {WITH_STAGE1: "-", STAGE2_ALONE: "--"}
    colors = {}
    for ax in axes:
        for run in result["runs"]:
            color = colors.setdefault(run["init"], f"C{len(colors)}")
            tokens, ppl = zip(*run["curve"], strict=True)
            ax.plot(
                [t / 1e6 for t in tokens],
                ppl,
                styles.get(run["schedule"], ":"),
                marker="o",
                ms=3,
                color=color,
                label=f"{run['init']}, {run['schedule']}",
            )
        for name, value in result["targets"].items():
            ax.axhline(value, ls=":", lw=0.8, color="gray")
            ax.text(0.01, value, name, fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
        ax.axhline(result["teacher_ppl"], color="k", lw=1, label="teacher")
        ax.set(yscale="log", xlabel="training tokens, all stages (millions)")
    axes[0].set(ylabel="held-out perplexity", title="recovery with and without stage 1")
    top = 5 * max(result["targets"].values())
    axes[1].set(ylim=(0.9 * result["teacher_ppl"], top), title="near the targets")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_outputs(result: dict, out_dir: str) -> dict:
    """<out_dir>/recovery_schedules_<tag>.{json,md,png}."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"recovery_schedules_{result['tag']}")
    paths = {k: f"{base}.{k}" for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    plot(result, paths["png"])
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.results or len(FLAGS.results) < 2 or FLAGS.tag is None:
        raise app.UsageError("give --results=<a>.json,<b>.json (two or more) and --tag")
    import results_io  # launch/

    try:
        result = compare(recovery.read_results(FLAGS.results), results_io.invocation(), FLAGS.tag)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    write_outputs(result, FLAGS.out)
    print(markdown(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    define_flags()
    app.run(main)
