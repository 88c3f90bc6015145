"""One run: validate everything, plan, lock the workdir, run or skip each stage, summarise.

    1. validate the config (validate.py) and the workdir path; the one thing written before
       the lock is a `.gguf` teacher's conversion into `<workdir>/gguf` (once, cached; its
       config.json is how the architecture is read and checked), even for `dry_run`
    2. start jax.distributed if asked, check the mesh against the devices
    3. plan (plan.py), and check the stages it runs against the mesh sizes; `dry_run` prints
       the plan and stops here
    4. lock the workdir, delete `.partial` leftovers, append this run to config.json
    5. record every stage that will run from scratch "pending" (plan.py), and the recorded
       stages it does not list that use what it makes anew; then per stage: skip,
       or remove its old outputs (and, unless it resumes, its checkpoints), record it
       "running", run it with the one RunContext, record it "done" with its result
    6. summary.md after every stage, training_curves.png after every training stage
       (eval/training_curves.py); the final summary on stdout

With several processes every process runs every step, following the plan process 0 makes
under the lock (`main_plan`); process 0 alone locks the workdir, writes and removes in it
(run/workdir.py), prints and writes metrics and summaries.

Results of skipped stages come from their records, so summary.md and the final summary
always describe every listed stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

from taylorcal_jax.errors import ConfigError, UserError
from taylorcal_jax.eval import training_curves
from taylorcal_jax.run import plan as plan_lib
from taylorcal_jax.run import validate as validate_lib
from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.run.console import Console
from taylorcal_jax.run.context import RunContext
from taylorcal_jax.train import student_dirs
from taylorcal_jax.utils import hosts, interrupts, progress
from taylorcal_jax.utils.metrics import format_value, plain, write_summary


def prepare(config, workdir: str, registry: Mapping, rerun: Sequence[str] = ()):
    """Steps 1-3 (no writes): (the plan, the mesh sizes), or ConfigError."""
    workdir_lib.check_workdir(workdir)
    validate_lib.validate(config, registry, workdir)
    import jax  # noqa: PLC0415

    try:
        hosts.initialize(config.mesh.distributed)
    except ValueError as e:
        raise ConfigError(f"mesh.distributed: {e}", "see launch/multihost.py") from e
    sizes = validate_lib.mesh_sizes(config, jax.device_count())
    records = workdir_lib.read_records(workdir) if os.path.isdir(workdir) else {}
    return main_plan(config, workdir, registry, records, rerun, sizes), sizes


def run(
    config,
    workdir: str,
    registry: Mapping,
    *,
    command: str = "(library call)",
    rerun: Sequence[str] = (),
    dry_run: bool = False,
    console: Console | None = None,
) -> dict:
    """Runs `config.stages` in `workdir`; returns {stage: result} (empty for a dry run)."""
    console = console or Console()
    t_run = time.perf_counter()
    steps, sizes = prepare(config, workdir, registry, rerun)
    if dry_run:
        holder = workdir_lib.lock_holder(workdir) if hosts.is_main() else None
        if holder is not None:
            console.note(
                f"{workdir} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (started {holder.get('started', '?')}): the plan "
                "below is what a run would do now, and changes as that run goes on"
            )
        console.plan(steps, registry, workdir)
        return {}
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.WorkdirLock(workdir, console.note):
        # Re-plan under the lock: the workdir may have changed since the first look.
        records = workdir_lib.read_records(workdir)
        # (main_plan is a collective: every process has read the records before they change)
        steps = main_plan(config, workdir, registry, records, rerun, sizes)
        mark_pending(workdir, steps, records, config, registry)
        leftovers = workdir_lib.remove_partials(workdir)
        if leftovers:
            console.note(f"removed {len(leftovers)} partial outputs of an interrupted run")
        started = workdir_lib.now()
        workdir_lib.append_history(
            workdir,
            {
                "command": command,
                "started": started,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "stages": list(config.stages),
                "config": config.to_dict(),
            },
        )
        progress.set_enabled(config.progress)
        # (the corpus loads lazily: a pretrain that runs writes the tokenizer it is cut with)
        samples = [s for step in steps if step.action != "skip"
                   for s in registry[step.name].samples(config)]  # fmt: skip
        ctx = RunContext(config, workdir, samples)
        header = {"command": command, "started": started, "stages": ", ".join(config.stages)}
        results = {step.name: planned_result(step, records) for step in steps}
        # summary.md at once: the last run's results of the stages this one redoes are gone
        write_summary(workdir, f"taylorcal_jax run in {workdir}", {"run": header, **results})
        seconds = {}
        for i, step in enumerate(steps, 1):
            if interrupts.requested():  # a signal during the last stage's final call
                raise KeyboardInterrupt
            stage = registry[step.name]
            if step.action == "skip":
                console.stage_skipped(i, len(steps), step)
                continue
            started = functools.partial(console.stage_start, i, len(steps), step, stage.summary)
            result, seconds[step.name] = run_stage(ctx, stage, step, records, started)
            console.stage_done(seconds[step.name], result)
            results[step.name] = dict(result, stage_seconds=round(seconds[step.name], 1))
            write_summary(workdir, f"taylorcal_jax run in {workdir}", {"run": header, **results})
            if step.name in training_curves.TRAINING_STAGES:
                training_curves.write_plot(workdir)
        wall = time.perf_counter() - t_run
        write_summary(
            workdir,
            f"taylorcal_jax run in {workdir}",
            {"run": dict(header, wall_seconds=round(wall, 1)), **results},
        )
        console.summary(summary_rows(config, workdir, steps, results, seconds, wall))
    return results


def main_plan(config, workdir: str, registry: Mapping, records: dict, rerun, sizes):
    """The plan as process 0 makes it, on every process: each process fingerprints the inputs
    it sees (an external teacher's weight files by size and modification time), and hosts
    holding equal copies of a teacher would otherwise plan differently and part ways. The
    stages it runs are checked against the mesh sizes (ConfigError)."""
    steps = hosts.main_value(
        lambda: [
            dataclasses.asdict(s)
            for s in plan_lib.make_plan(config, workdir, registry, records, rerun, sizes)
        ],
        f"planning {workdir}",
    )
    steps = [plan_lib.Step(**s) for s in steps]
    running = [s.name for s in steps if s.action != "skip"]
    validate_lib.check_devices(config, registry, sizes, running)
    return steps


def planned_result(step, records: dict) -> dict:
    """A stage's entry in the summary before this run reaches it: a skipped stage's recorded
    result (none when it is skipped as not needed and its record is of other settings), else
    what this run will do."""
    if step.action != "skip":
        return {"status": "to resume" if step.action == "resume" else "to run"}
    rec = records.get(step.name, {})
    same = rec.get("fingerprint") == step.fingerprint
    return {**(dict(rec.get("result", {})) if same else {}), "skipped": step.reason}


def mark_pending(workdir: str, steps, records: dict, config, registry: Mapping) -> None:
    """Records every stage this run will run from scratch as "pending", before the first
    starts: a stage is rerun with its record unchanged when --rerun asks for it (or its
    outputs are missing), and a run stopped before reaching it must not leave it "done" with
    results made from the inputs this run replaced. So are the recorded stages this run
    does not list that use what it makes anew (config.stages=pretrain with --rerun=pretrain:
    every stage after it), which the next run that lists them runs again."""
    marked = False
    for step in steps:
        rec = records.get(step.name)
        # done, or interrupted with a checkpoint this run restarts instead of resuming (a run
        # stopped before reaching it must not leave that checkpoint to be resumed next time)
        if step.action == "run" and rec is not None and rec.get("status") != "pending":
            rec["status"] = "pending"
            marked = True
    making = [step.name for step in steps if step.action != "skip"]
    listed = {step.name for step in steps}
    for name in plan_lib.consumers(config, registry, making):
        rec = records.get(name)
        # done, or interrupted with a checkpoint of the old inputs: restarted when next listed
        if name not in listed and rec is not None and rec.get("status") != "pending":
            rec["status"] = "pending"
            rec["pending_because"] = "an input was made again by a run that did not list it"
            marked = True
    if marked:
        workdir_lib.write_records(workdir, records)


def run_stage(ctx, stage, step, records: dict, started: Callable[[], None]):
    """Runs one stage: removes its old outputs (and checkpoints, unless it resumes), records
    it "running", calls `started()`, runs it, records "done" with the result, or "failed" /
    "interrupted" (Ctrl-C) if it raises. Returns (result, seconds)."""
    workdir = ctx.workdir
    for rel in stage.outputs + (stage.checkpoints if step.action == "run" else ()):
        workdir_lib.remove(ctx.path(rel))
    record = {
        "fingerprint": step.fingerprint,
        "settings": step.settings,
        "inputs": step.inputs,
        "status": "running",  # what a kill -9 leaves
        "started": workdir_lib.now(),
    }
    if step.mesh:
        record["mesh"] = step.mesh  # the sizes its checkpoints are shaped by
    records[step.name] = record
    workdir_lib.write_records(workdir, records)
    # where the rows of this run begin in metrics.jsonl ("run": from scratch; "resume")
    ctx.metrics.write(step.name, start=step.action)
    started()
    t0 = time.perf_counter()
    try:
        result = plain(dict(stage.run(ctx)))
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        record.update(status=status, finished=workdir_lib.now())
        workdir_lib.write_records(workdir, records)
        damaged = _damaged_input(e, step)
        if damaged is not None:
            raise damaged from e
        raise
    seconds = time.perf_counter() - t0
    record.update(status="done", finished=workdir_lib.now(), seconds=round(seconds, 1))
    record["result"] = result
    workdir_lib.write_records(workdir, records)
    ctx.metrics.write(step.name, stage_seconds=round(seconds, 1), done=True)
    return result, seconds


def _damaged_input(error: BaseException, step) -> UserError | None:
    """A UserError naming the stages to rerun where a stage failed reading a checkpoint: an
    output of an earlier stage, damaged since it was made (the plan sees only that it is
    there), e.g. a student directory whose weights were deleted. None for any other error."""
    from taylorcal_jax.models import hf_io, safetensors_io  # noqa: PLC0415

    if not isinstance(error, (hf_io.CheckpointError, safetensors_io.CorruptCheckpointError)):
        return None
    makers = [name for name in step.inputs if name not in plan_lib.SOURCES]
    if not makers:  # the teacher's own errors are UserErrors already (RunContext.teacher)
        return None
    return UserError(
        f"stage '{step.name}' cannot read an input: {error}",
        f"rerun the stage that made it (--rerun={makers[0]})"
        if len(makers) == 1
        else f"rerun the stages that made its inputs (one of --rerun={', '.join(makers)})",
    )


def summary_rows(config, workdir, steps, results, seconds, wall) -> list[tuple[str, str]]:
    """The final summary: perplexities, kept layers, time per stage, where the outputs are."""
    rows = []
    split = config.eval.split
    teacher_ppl = results.get("eval_student", {}).get("teacher_ppl")
    if teacher_ppl is None:
        teacher_ppl = results.get("eval_teacher", {}).get(f"{split}_ppl")
    if teacher_ppl is not None:
        rows.append((f"teacher ppl ({split})", format_value(teacher_ppl)))
    student = results.get("eval_student", {})
    if "student_ppl" in student:
        rows.append((f"student ppl ({split})", format_value(student["student_ppl"])))
    kept = results.get("select_layers", {}).get("keep_full_attention_layers")
    if kept is not None:
        rows.append(("kept attention layers", format_value(kept)))
    times = [
        f"{s.name} {seconds[s.name]:.1f} s" if s.name in seconds else f"{s.name} skipped"
        for s in steps
    ]
    rows.append(("stages", ", ".join(times)))
    rows.append(("wall time", f"{wall:.1f} s"))
    # the outputs of the listed stages only: others may be of an earlier run on other inputs
    listed = set(config.stages)
    paths = [] if config.teacher.path else ["teacher"]  # the teacher this run used
    if listed & set(student_dirs.STUDENT_DIRS):
        paths.append(student_dirs.student_dir(config, "eval_student"))  # the latest student
    if "eval_student" in listed:
        paths.append("calibration_report.json")
    paths += ["summary.md", "metrics.jsonl", training_curves.FILENAME]
    outputs = [os.path.join(workdir, p) for p in paths if os.path.exists(os.path.join(workdir, p))]
    if config.teacher.path:
        outputs.insert(0, f"{config.teacher.path} (teacher)")
    rows.append(("outputs", ", ".join(outputs)))
    return rows
