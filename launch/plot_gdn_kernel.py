"""Bar chart of a GDN kernel result file (bench_gdn_kernel.py's JSON): ours against FLA per row.

Three panels per shape row: forward ms, forward + backward ms and peak MiB, ours and FLA side by
side, with ours / FLA written above each pair. Reads the file only; measures nothing.

Usage: python launch/plot_gdn_kernel.py [launch/results/gdn_kernel_h100.json] [--out PNG]
  (default output: the JSON's path with .png)
"""

from __future__ import annotations

import argparse
import json
import os

PANELS = (
    ("fwd_ms", "forward (ms)"),
    ("fwdbwd_ms", "forward + backward (ms)"),
    ("peak_mib", "peak memory (MiB)"),
)


def _shape_label(shape) -> str:
    return " x ".join(str(x) for x in shape)


def panel_values(result: dict, key: str) -> tuple[list[float], list[float]]:
    """(ours, FLA) of one panel's key over the rows; a missing figure is NaN (drawn as a gap)."""
    nan = float("nan")
    ours = [float(r.get(f"ours_{key}", nan)) for r in result["rows"]]
    fla = [float(r.get(f"fla_{key}", nan)) for r in result["rows"]]
    return ours, fla


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not result.get("rows"):
        raise ValueError("the result file has no rows to plot")
    labels = [_shape_label(r["shape"]) for r in result["rows"]]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(14, 3.8))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ours, fla = panel_values(result, key)
        ax.bar(x - 0.2, ours, 0.4, label="ours (Pallas)")
        ax.bar(x + 0.2, fla, 0.4, label="FLA 0.6.0")
        for xi, a, b in zip(x, ours, fla, strict=True):
            if a == a and b == b and b > 0:  # both present
                ax.annotate(
                    f"{a / b:.2f}",
                    (xi, max(a, b)),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.set_xticks(x, labels, rotation=20, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"gated delta rule, bf16, B x T x H x D; ours / FLA above each pair; "
        f"{result.get('device', '?')}, {str(result.get('date', '?'))[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    default = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "gdn_kernel_h100.json"
    )
    ap.add_argument("result", nargs="?", default=default)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with open(a.result) as f:
        result = json.load(f)
    out = a.out or os.path.splitext(a.result)[0] + ".png"
    plot(result, out)
    print(out)


if __name__ == "__main__":
    main()
