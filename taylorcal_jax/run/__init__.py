"""Running the pipeline: everything between the command line and the stages.

    fields     the config schema: defaults and descriptions from configs/common.py
    validate   whole-config checks before any work (ConfigError, one line each)
    inputs     where the teacher and the text come from; their checks and fingerprints
    plan       Stage declarations, fingerprints, and which stages run, resume or skip
    workdir    the lock, atomic outputs, stage records and the history of runs
    context    RunContext: config, mesh, teacher and corpus, each made once per run
    console    stage lines and the final summary
    runner     one run, start to end

Imports go one way: runner -> (plan, validate, context, console, workdir) -> (inputs,
fields); the stage modules (train/stages.py, calibrate/pipeline.py) use plan, validate,
context and workdir, and main.py joins the two.
"""
