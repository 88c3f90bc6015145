"""Provenance and writing of benchmark result files (launch/results/*.json).

Every result records the device, the JAX version, the date and the exact command, so that a
figure can be traced to the run that produced it and rerun.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_revision() -> str | None:
    """The repository's commit ("<hash>+dirty" with uncommitted changes), or None outside git."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", repo, *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        rev = run("rev-parse", "--short=12", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def provenance() -> dict:
    """{"device", "jax_version", "date", "command", "git"} of this process."""
    import jax

    from taylorcal_jax.train.stages import device_description

    return {
        "device": device_description(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git": git_revision(),
    }


def write_result(out_dir: str, stem: str, tag: str, small: bool, result: dict) -> str:
    """Writes <out_dir>/<stem>_<tag>.json (tag: given, "small", or the device kind)."""
    import jax

    tag = tag or ("small" if small else jax.devices()[0].device_kind.replace(" ", "_"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
