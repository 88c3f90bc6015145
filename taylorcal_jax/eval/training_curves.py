"""A run's training curves, from its metrics.jsonl: for each stage that trains on a token
stream (pretrain, distill_layers, distill), the training loss and the held-out perplexity
against the tokens seen, as data (`training_curves`) and as a plot (`write_plot`:
<workdir>/training_curves.png, redrawn at the training stages' evaluations at most once a
minute, and by the runner after each of those stages).

Rows of a stage: loss rows carry "loss" and "tokens"; evaluation rows carry "tokens" and a
perplexity ("eval_ppl"; pretraining's "valid_ppl"). A resumed stage logs some points again:
the last row of each (stage, tokens, kind) wins. Only the rows of a stage's latest run from
scratch count (`latest_run`), so the curves show the latest training of each stage, not the
points of a run interrupted or finished under other settings.
"""

from __future__ import annotations

import os
import time

from taylorcal_jax.utils import files, hosts
from taylorcal_jax.utils.metrics import read_metrics

TRAINING_STAGES = ("pretrain", "distill_layers", "distill")
PPL_KEYS = ("eval_ppl", "valid_ppl")  # distillation's, pretraining's
FILENAME = "training_curves.png"
DURING_TRAINING_S = 60.0  # the least time between redraws at a training stage's evaluations
# What each stage's loss is (the plot's y labels).
LOSS_NAMES = {
    "pretrain": "next-token cross-entropy",
    "distill_layers": "per-layer output error",
    "distill": "KL(teacher || student)",
}


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of a stage's latest run: from its last start row from scratch ({"start":
    "run"}, written by the runner; a resumed run's start row says "resume" and keeps the rows
    of the run it continues) on; all rows where there is none."""
    starts = [i for i, r in enumerate(rows) if r.get("start") == "run"]
    return rows[starts[-1] :] if starts else rows


def training_curves(rows: list[dict]) -> dict:
    """{stage: {"loss": [[tokens, loss], ...], "ppl": [[tokens, ppl], ...]}} in tokens order,
    for the TRAINING_STAGES with at least one point (module docstring)."""
    out = {}
    for stage in TRAINING_STAGES:
        points = {"loss": {}, "ppl": {}}
        for r in latest_run([r for r in rows if r.get("stage") == stage]):
            if "tokens" not in r:
                continue
            t = int(r["tokens"])
            if isinstance(r.get("loss"), (int, float)):
                points["loss"][t] = float(r["loss"])
            ppl = next((r[k] for k in PPL_KEYS if isinstance(r.get(k), (int, float))), None)
            if ppl is not None:
                points["ppl"][t] = float(ppl)
        if points["loss"] or points["ppl"]:
            out[stage] = {k: [[t, v] for t, v in sorted(p.items())] for k, p in points.items()}
    return out


def plot(curves: dict, path: str, title: str = "") -> None:
    """One column per stage: its loss (top) and held-out perplexity (bottom) against tokens
    (y on a log axis where it spans more than a factor of 10)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    stages = list(curves)
    fig, axes = plt.subplots(2, len(stages), figsize=(4.5 * len(stages), 6.5), squeeze=False)
    for col, stage in enumerate(stages):
        for row, (kind, ylabel) in enumerate(
            (("loss", LOSS_NAMES.get(stage, "loss")), ("ppl", "held-out perplexity"))
        ):
            ax = axes[row, col]
            pts = curves[stage][kind]
            if pts:
                tokens, values = zip(*pts, strict=True)
                marker = "o" if len(pts) <= 40 else None
                ax.plot(tokens, values, marker=marker, ms=3, lw=1)
                if min(values) > 0 and max(values) > 10 * min(values):  # log only when it spans
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel="training tokens", ylabel=ylabel)
            if row == 0:
                ax.set_title(stage)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_plot(workdir: str, min_interval_s: float = 0.0) -> str | None:
    """<workdir>/training_curves.png from <workdir>/metrics.jsonl (written whole under a
    temporary name, then renamed); None, writing nothing, when no stage has trained yet, on a
    process other than the main one, or when the plot is younger than `min_interval_s` (the
    training stages redraw it at their evaluations, at most once a minute: DURING_TRAINING_S)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    path = os.path.join(workdir, FILENAME)
    if not hosts.is_main() or not os.path.exists(metrics):
        return None
    if min_interval_s > 0 and os.path.exists(path):
        if time.time() - os.path.getmtime(path) < min_interval_s:
            return None
    curves = training_curves(read_metrics(metrics))
    if not curves:
        return None
    with files.replaced_when_done(path) as tmp:
        plot(curves, tmp, title=f"training in {os.path.basename(workdir.rstrip('/'))}")
    return path
