"""Every stage the command line can run, in pipeline order (the order --help lists and a
misordered config.stages is told to use).

Kept apart from `taylorcal_jax.main`, which defines command-line flags on import, so launch
scripts and tests can validate and run configs against the same registry.
"""

from __future__ import annotations

from taylorcal_jax.calibrate import pipeline as calibrate_pipeline
from taylorcal_jax.train import distill_stages, stages

STAGES = {
    **stages.STAGES,
    **{k: v for k, v in calibrate_pipeline.STAGES.items() if k != "eval_student"},
    **distill_stages.STAGES,
    "eval_student": calibrate_pipeline.STAGES["eval_student"],
}
