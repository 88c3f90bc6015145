"""Command line: run the stages of a config in a workdir.

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=/tmp/taylorcal_tiny
    python -m taylorcal_jax.main --config=configs/tiny.py:smoke --workdir=/tmp/smoke \
        --config.pretrain.steps=20

Writes <workdir>/config.json (the resolved config), metrics.jsonl (one JSON object per
event) and summary.md (updated after every stage). Stage functions live in STAGES.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from taylorcal_jax.calibrate import pipeline as calibrate_pipeline
from taylorcal_jax.train import stages
from taylorcal_jax.utils import progress
from taylorcal_jax.utils.metrics import MetricsWriter, write_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs; reruns resume in it.")

# name -> fn(config, workdir, metrics) -> dict (shown in summary.md)
STAGES = {
    "pretrain": stages.pretrain_stage,
    "eval_teacher": stages.eval_teacher_stage,
    **calibrate_pipeline.STAGES,  # statistics, calibrate, align, select_layers, eval_student
}


def run(config, workdir: str, command: str = "(library call)") -> dict:
    """Validates the config, then runs `config.stages` in order; returns {stage: results}."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {sorted(STAGES)}")
    stages.validate(config)
    if config.mesh.distributed:
        import jax  # noqa: PLC0415

        jax.distributed.initialize()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    progress.set_enabled(config.progress)
    metrics = MetricsWriter(workdir)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary = {
        "run": {
            "command": command,
            "started": started,
            "stages": ", ".join(config.stages),
        }
    }
    for name in config.stages:
        t0 = time.perf_counter()
        result = dict(STAGES[name](config, workdir, metrics))
        result["stage_seconds"] = round(time.perf_counter() - t0, 1)
        metrics.write(name, stage_seconds=result["stage_seconds"], done=True)
        summary[name] = result
        write_summary(workdir, f"taylorcal_jax run in {workdir}", summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run(_CONFIG.value, _WORKDIR.value, "python -m taylorcal_jax.main " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
