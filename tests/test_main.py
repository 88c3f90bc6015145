"""The command line as a user meets it: a smoke run end to end, reruns that skip, resume or
redo exactly what changed, kill -9 in the middle of a stage, one-line errors, help.

Subprocesses run on one CPU device (as a user's laptop would), on configs/tiny.py:smoke
shrunk further (SMOKE below) so that the whole file stays within a few minutes.
"""

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from suite_env import suite_xla_flags

from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.train.student_dirs import STUDENT_DIRS
from taylorcal_jax.utils.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one CPU device; the suite's compile flags (conftest.py)
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=suite_xla_flags(),
    PYTHONPATH=ROOT,
)
ALL_STAGES = [
    "pretrain",
    "eval_teacher",
    "statistics",
    "calibrate",
    "align",
    "select_layers",
    "distill_layers",
    "distill",
    "eval_student",
]
SMOKE = [
    "--config=configs/tiny.py:smoke",
    "--config.pretrain.steps=4",
    "--config.data.max_documents=30",
    "--config.eval.num_sequences=4",  # the 4 valid sequences pretraining evaluates on
    "--config.calibration.num_sequences=2",
    "--config.calibration.seq_len=16",
    "--config.calibration.block_size=8",
    "--config.calibration.align.steps=4",
    "--config.calibration.gdn.chunk_size=8",
    "--config.distill.save_students=True",  # the student at every evaluation of both stages
]


def cli(*args, timeout=600):
    cmd = [sys.executable, "-m", "taylorcal_jax.main", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One uninterrupted smoke run: (workdir, completed process)."""
    workdir = str(tmp_path_factory.mktemp("smoke") / "wd")
    proc = cli(*SMOKE, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def _copy(smoke, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(smoke[0], wd)
    return wd


def _partials(workdir):
    return [
        os.path.join(r, n)
        for r, ds, fs in os.walk(workdir)
        for n in ds + fs
        if n.endswith(workdir_lib.PARTIAL)
    ]


@pytest.mark.slow
def test_smoke_run_prints_stages_and_summary_and_records_everything(smoke):
    workdir, proc = smoke
    out = proc.stdout
    for i, name in enumerate(ALL_STAGES, 1):
        assert f"[{i}/{len(ALL_STAGES)}] {name}: " in out
    assert out.count("run: not run yet") == len(ALL_STAGES)
    assert "summary" in out and "teacher ppl (valid)" in out and "student ppl (valid)" in out
    assert "kept attention layers  [0]" in out
    outputs = next(line for line in out.splitlines() if line.strip().startswith("outputs"))
    # the student the summary's perplexity is of: the distilled one
    assert f"{workdir}/student_distilled," in outputs and f"{workdir}/student," not in outputs
    assert f"{workdir}/summary.md" in outputs
    runs = workdir_lib.read_history(workdir)
    assert len(runs) == 1 and runs[0]["config"]["pretrain"]["steps"] == 4
    assert "--config.pretrain.steps=4" in runs[0]["command"]
    records = workdir_lib.read_records(workdir)
    assert [records[s]["status"] for s in ALL_STAGES] == ["done"] * len(ALL_STAGES)
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["stage"] for r in metrics if r.get("done")] == ALL_STAGES
    # each stage's rows begin with the runner's start row (training_curves.latest_run)
    assert [r["stage"] for r in metrics if r.get("start") == "run"] == ALL_STAGES
    # eval_teacher reloads the saved HF teacher: the same sequences, the same perplexity.
    pretrained = records["pretrain"]["result"]
    evaluated = records["eval_teacher"]["result"]
    assert pretrained["tokens"] == 4 * 4 * 32
    assert abs(evaluated["valid_ppl"] - pretrained["valid_ppl"]) / pretrained["valid_ppl"] < 1e-5
    summary = open(os.path.join(workdir, "summary.md")).read()
    assert "## eval_student" in summary and "student_ppl" in summary
    assert "--config.pretrain.steps=4" in summary
    for path in ("teacher/model.safetensors", "student/student_config.json"):
        assert os.path.exists(os.path.join(workdir, path))
    assert os.path.getsize(os.path.join(workdir, "calibration_report.png")) > 10_000
    # the training curves of pretraining and both distillation stages, listed as an output
    assert open(os.path.join(workdir, "training_curves.png"), "rb").read(4) == b"\x89PNG"
    assert f"{workdir}/training_curves.png" in out
    assert not _partials(workdir) and not os.path.exists(os.path.join(workdir, ".lock"))


@pytest.mark.slow
def test_smoke_run_distils_in_both_stages_with_metrics_by_tokens_seen(smoke):
    """Each stage: 4 steps of 4 x 32 tokens, loss lines by tokens seen, held-out perplexity and
    a saved student at 0, 256 and 512 tokens; stage 2 starts from stage 1's student and
    eval_student scores stage 2's."""
    workdir, _ = smoke
    records = workdir_lib.read_records(workdir)
    summary = {s: records[s]["result"] for s in ("distill_layers", "distill", "eval_student")}
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    per_step = 4 * 32
    for stage in ("distill_layers", "distill"):
        evals = [
            (r["tokens"], r["eval_ppl"])
            for r in rows
            if r["stage"] == stage and "step" in r and "eval_ppl" in r
        ]
        assert [t for t, _ in evals] == [0, 2 * per_step, 4 * per_step]
        losses = [r["tokens"] for r in rows if r["stage"] == stage and "loss" in r]
        assert losses == [per_step * s for s in (1, 2, 3, 4)]
        assert summary[stage]["tokens"] == 4 * per_step
        assert summary[stage]["eval_ppl"] == evals[-1][1]
        saved = os.listdir(os.path.join(workdir, f"{stage}_train", "students"))
        assert sorted(saved) == [f"tokens_{t:012d}" for t, _ in evals]
        for name in saved:  # each one generates as the final student does: with its tokenizer
            assert os.path.exists(os.path.join(workdir, f"{stage}_train", "students", name,
                                               "tokenizer.json"))  # fmt: skip
    first_kl = [r["eval_ppl"] for r in rows if r["stage"] == "distill" and "eval_ppl" in r][0]
    assert first_kl == pytest.approx(summary["distill_layers"]["eval_ppl"], rel=1e-6)
    assert summary["eval_student"]["student"] == "student_distilled"
    assert summary["eval_student"]["student_ppl"] == pytest.approx(
        summary["distill"]["eval_ppl"], rel=1e-5
    )
    for d in ("student", "student_distill_layers", "student_distilled"):
        assert os.path.exists(os.path.join(workdir, d, "tokenizer.json"))


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(smoke, tmp_path):
    wd = _copy(smoke, tmp_path)
    before = os.stat(os.path.join(wd, "student", "student_config.json")).st_mtime_ns
    proc = cli(*SMOKE, f"--workdir={wd}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped (done, settings unchanged)") == len(ALL_STAGES)
    first = [line for line in smoke[1].stdout.splitlines() if "student ppl" in line]
    assert first == [line for line in proc.stdout.splitlines() if "student ppl" in line]
    assert os.stat(os.path.join(wd, "student", "student_config.json")).st_mtime_ns == before
    assert len(workdir_lib.read_history(wd)) == 2


def test_rerun_of_pretrain_reruns_every_stage_that_reads_the_teacher(smoke, tmp_path):
    wd = _copy(smoke, tmp_path)
    plan = cli(*SMOKE, f"--workdir={wd}", "--rerun=pretrain", "--dry_run")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.count("run: --rerun") == 1
    assert plan.stdout.count("run: an input is rerun (--rerun)") == len(ALL_STAGES) - 1
    # "all" with other names is all; a repeated --rerun (absl keeps the last) is refused
    plan = cli(*SMOKE, f"--workdir={wd}", "--rerun=all,align", "--dry_run")
    assert plan.returncode == 0 and plan.stdout.count("run: --rerun") == len(ALL_STAGES)
    twice = cli(*SMOKE, f"--workdir={wd}", "--rerun=align", "--rerun=distill", "--dry_run")
    assert twice.returncode == 2 and "error: --rerun is given 2 times" in twice.stderr


def test_a_finished_workdir_plans_on_a_device_count_its_batches_do_not_split_over(smoke, tmp_path):
    """Every listed stage was checked against the mesh, skipped ones too: on 3 devices a
    finished workdir was refused for distill's batch of 4. Only the stages that run are."""
    wd = _copy(smoke, tmp_path)
    env = dict(ENV, XLA_FLAGS=suite_xla_flags("--xla_force_host_platform_device_count=3"))
    cmd = [sys.executable, "-m", "taylorcal_jax.main", *SMOKE, f"--workdir={wd}", "--dry_run"]
    run = functools.partial(subprocess.run, cwd=ROOT, env=env, capture_output=True, text=True)
    plan = run(cmd)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.count("skip: done, settings unchanged") == len(ALL_STAGES), plan.stdout
    plan = run([*cmd, "--rerun=distill"])
    assert plan.returncode == 2 and "does not split over the 3 devices" in plan.stderr


def test_a_split_too_small_is_one_error_line_naming_what_to_change(smoke, tmp_path):
    wd = _copy(smoke, tmp_path)
    proc = cli(*SMOKE, f"--workdir={wd}", "--config.calibration.num_sequences=100000")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: calibration: 100000 sequences of 16 tokens need 1600000 tokens" in proc.stderr
    assert "data.valid_fraction and data.test_fraction" in proc.stderr  # the train split's hint


def test_a_damaged_input_names_the_stage_to_rerun(smoke, tmp_path):
    """An earlier stage's output damaged since (the plan sees only that it is there) is a
    one-line error naming the stage that made it, not a traceback."""
    wd = _copy(smoke, tmp_path)
    os.remove(os.path.join(wd, "student", "model.safetensors"))
    proc = cli(*SMOKE, f"--workdir={wd}", "--config.distill.layers.learning_rate=0.002")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: stage 'distill_layers' cannot read an input: " in proc.stderr
    assert "hint: rerun the stage that made it (--rerun=select_layers)" in proc.stderr


def test_settings_that_change_no_result_rerun_nothing(smoke, tmp_path):
    # how often pretraining logs, saves and evaluates, and the undecodable share at which a run
    # stops, change neither the teacher nor a token
    wd = _copy(smoke, tmp_path)
    changes = ("pretrain.log_every=3", "pretrain.checkpoint_every=7", "pretrain.eval_every=5")
    changes += ("pretrain.eval_sequences=2", "data.max_undecodable_fraction=0.001")
    plan = cli(*SMOKE, f"--workdir={wd}", *(f"--config.{c}" for c in changes), "--dry_run")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.count("skip: done, settings unchanged") == len(ALL_STAGES), plan.stdout
    # the held-out set: the distillation stages report perplexities on it along training
    plan = cli(*SMOKE, f"--workdir={wd}", "--config.eval.seq_len=16", "--dry_run")
    lines = plan.stdout.splitlines()
    actions = {  # "[i/n] stage: what it does" is followed by "      action: reason"
        line.split("] ")[1].split(":")[0]: nxt.strip()
        for line, nxt in zip(lines, lines[1:], strict=False)
        if line.startswith("[")
    }
    for stage in ("eval_teacher", "eval_student", "distill_layers", "distill"):
        assert actions[stage].startswith("run: settings changed: eval.seq_len"), plan.stdout


@pytest.mark.slow
def test_changed_teacher_retrains_it_instead_of_reusing_it_or_its_checkpoints(smoke, tmp_path):
    """The old pretrain_ckpt (another architecture) is removed, never restored."""
    wd = _copy(smoke, tmp_path)
    args = [*SMOKE, f"--workdir={wd}", "--config.teacher.hidden_size=48"]
    plan = cli(*args, "--dry_run")
    assert "run: settings changed: teacher.hidden_size 32 -> 48" in plan.stdout
    # everything downstream of it
    assert plan.stdout.count("run: inputs changed") == len(ALL_STAGES) - 1
    proc = cli(*args, "--config.stages=('pretrain',)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run: settings changed: teacher.hidden_size 32 -> 48" in proc.stdout
    with open(os.path.join(wd, "teacher", "config.json")) as f:
        assert json.load(f)["hidden_size"] == 48
    history = workdir_lib.read_history(wd)
    assert [r["config"]["teacher"]["hidden_size"] for r in history] == [32, 48]
    # the final summary's outputs are this run's: not the students made from the old teacher
    outputs = next(line for line in proc.stdout.splitlines() if line.strip().startswith("outputs"))
    assert f"{wd}/teacher" in outputs and "student" not in outputs
    assert "calibration_report" not in outputs


def _outputs(stage, workdir):
    """Arrays (or numbers) a stage wrote, to compare a resumed run with the reference."""
    if stage == "statistics":
        z = np.load(os.path.join(workdir, "calibration", "stats.npz"))
        return {k: z[k] for k in z.files}
    if stage == "align":
        with open(os.path.join(workdir, "calibration", "align_report.json")) as f:
            report = json.load(f)["align"]
        student = _student_arrays(os.path.join(workdir, "calibration", "aligned"))
        return {**student, "loss_after": np.asarray(report["loss_after"])}
    if stage in ("distill_layers", "distill"):
        result = workdir_lib.read_records(workdir)[stage]["result"]
        out = _student_arrays(os.path.join(workdir, STUDENT_DIRS[stage]))
        out.update({k: np.asarray(result[k]) for k in ("steps", "eval_ppl")})
        students = os.path.join(workdir, f"{stage}_train", "students")  # distill.save_students
        for name in os.listdir(students):
            arrays = _student_arrays(os.path.join(students, name))
            out.update({f"{name}/{k}": v for k, v in arrays.items()})
        return out
    with open(os.path.join(workdir, "calibration_report.json")) as f:
        report = json.load(f)
    return {k: np.asarray(report[k]) for k in ("teacher_ppl", "student_ppl", "eval_tokens")}


def _student_arrays(path):
    """{parameter path: array} of the student directory `path` (its safetensors)."""
    from taylorcal_jax.models.student import load_student

    _, params = load_student(path)
    return {str(k): np.asarray(v) for k, v in _flatten(params).items()}


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["statistics", "eval_student"])
def test_kill_9_mid_stage_then_rerun_equals_an_uninterrupted_run(smoke, tmp_path, stage):
    wd = _copy(smoke, tmp_path)
    # eval_student evaluates the student of the last distillation stage listed before it
    # (train/student_dirs.py): list those too (done, so skipped) to score the same student.
    stages = (stage,) if stage == "statistics" else ("distill_layers", "distill", stage)
    args = [*SMOKE, f"--workdir={wd}", f"--config.stages={stages!r}"]
    cmd = [sys.executable, "-m", "taylorcal_jax.main", *args, f"--rerun={stage}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    n = len(stages)
    for line in proc.stdout:  # the stage line is printed once the stage has started
        if line.startswith(f"[{n}/{n}] {stage}:"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workdir_lib.read_records(wd)[stage]["status"] == "running"  # killed mid-stage
    # summary.md no longer shows the result the --rerun removed, but that the stage is to run
    summary = open(os.path.join(wd, "summary.md")).read()
    assert summary.split(f"## {stage}")[1].split("##")[0].count("| status | to run |") == 1
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "run: interrupted; restarting" in rerun.stdout
    want, got = _outputs(stage, smoke[0]), _outputs(stage, wd)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    assert not _partials(wd) and not os.path.exists(os.path.join(wd, ".lock"))


@dataclasses.dataclass(frozen=True)
class Resumable:
    """A training stage given many steps and a checkpoint every few: time to kill it between
    its first checkpoint and its end."""

    stages: tuple[str, ...]  # listed: the stage last, after the done stages it reads from
    overrides: tuple[str, ...]
    checkpoints: str  # workdir-relative orbax directory
    steps: int
    every: int  # steps between checkpoints


# distill_layers and distill: 30 steps of 4 x 32 tokens, a checkpoint every 5, the student
# saved at the first and the last evaluation (those of the killed run are kept on resume).
_DISTILL = ("train_tokens=3840", "checkpoint_every_tokens=640", "eval_every_tokens=0")
RESUMABLE = {
    "align": Resumable(
        ("align",),
        ("calibration.align.steps=400", "calibration.align.checkpoint_every=10"),
        "calibration/align_ckpt",
        400,
        10,
    ),
    "distill_layers": Resumable(
        ("distill_layers",),
        ("distill.save_students=True", *(f"distill.layers.{o}" for o in _DISTILL)),
        "distill_layers_train/checkpoints",
        30,
        5,
    ),
    "distill": Resumable(
        ("distill_layers", "distill"),  # stage 2 goes on from stage 1's student
        ("distill.save_students=True", *(f"distill.kl.{o}" for o in _DISTILL)),
        "distill_train/checkpoints",
        30,
        5,
    ),
}


def _saved_a_checkpoint(workdir, stage, ckpt):
    """Whether `stage` runs in `workdir` (its record says so once its old checkpoints are
    removed) and has finished a checkpoint in `ckpt` (orbax renames a step's directory to its
    number once the step is written)."""
    running = workdir_lib.read_records(workdir).get(stage, {}).get("status") == "running"
    return running and os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(RESUMABLE))
def test_kill_9_after_a_checkpoint_resumes_and_ends_where_an_uninterrupted_run_ends(
    smoke, tmp_path, stage
):
    """Killed after the stage's first checkpoint, the rerun resumes from the last one and ends
    bit-for-bit where an uninterrupted run with the same settings ends."""
    spec = RESUMABLE[stage]
    args = [
        *SMOKE,
        f"--config.stages={spec.stages!r}",
        *(f"--config.{o}" for o in spec.overrides),
    ]
    reference = str(tmp_path / "reference")
    shutil.copytree(smoke[0], reference)
    proc = cli(*args, f"--workdir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    wd = str(tmp_path / "killed")
    shutil.copytree(smoke[0], wd)
    ckpt = os.path.join(wd, spec.checkpoints)
    cmd = [sys.executable, "-m", "taylorcal_jax.main", *args, f"--workdir={wd}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _saved_a_checkpoint(wd, stage, ckpt):
        assert proc.poll() is None, f"{stage} ended before a checkpoint was seen"
        assert time.monotonic() < deadline, f"no {stage} checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workdir_lib.read_records(wd)[stage]["status"] == "running"  # killed mid-stage
    rerun = cli(*args, f"--workdir={wd}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resume: interrupted; resuming from its checkpoint" in rerun.stdout
    metrics = read_metrics(os.path.join(wd, "metrics.jsonl"))
    resumed = [r["resumed_from_step"] for r in metrics if "resumed_from_step" in r]
    assert len(resumed) == 1 and resumed[0] % spec.every == 0, resumed
    assert 0 < resumed[0] <= spec.steps, resumed
    want, got = _outputs(stage, reference), _outputs(stage, wd)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The checkpoints are removed once the outputs are written.
    for workdir in (wd, reference):
        assert not os.path.exists(os.path.join(workdir, spec.checkpoints)), workdir
    assert not _partials(wd) and not os.path.exists(os.path.join(wd, ".lock"))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--rerun=distill_layers",)], ids=["plain", "rerun"])
def test_sigterm_saves_the_last_finished_step_and_the_rerun_resumes_there(smoke, tmp_path, flags):
    """SIGTERM (preemption, `timeout`) is taken as Ctrl-C: with checkpoints due only at the
    end, the training loop saves the step it had reached (exit 128 + 15) and the rerun resumes
    from it; before, everything since the stage began was lost. Stopped under --rerun, the
    message says to run again without it (with it the stage would start over)."""
    wd = _copy(smoke, tmp_path)
    stage, steps = "distill_layers", 200
    args = [
        *SMOKE,
        f"--config.stages={(stage,)!r}",
        f"--config.distill.layers.train_tokens={steps * 128}",
        f"--config.distill.layers.checkpoint_every_tokens={steps * 128}",
        "--config.distill.layers.eval_every_tokens=0",
        "--config.distill.log_every=1",
        f"--workdir={wd}",
    ]
    path, deadline = os.path.join(wd, "metrics.jsonl"), time.monotonic() + 300
    earlier = len(read_metrics(path))  # the smoke run's rows, this stage's among them
    cmd = [sys.executable, "-m", "taylorcal_jax.main", *args, *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def trained_steps():
        rows = read_metrics(path)[earlier:]
        return max((r["step"] for r in rows if r["stage"] == stage and "loss" in r), default=0)

    while trained_steps() < 3:
        assert proc.poll() is None, "the stage ended before it was stopped"
        assert time.monotonic() < deadline, "no training steps within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    if flags:
        assert "interrupted; run the command again without --rerun to resume (with it, " in err
    else:
        assert "interrupted; run the same command again to resume" in err
    assert workdir_lib.read_records(wd)[stage]["status"] == "interrupted"
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resume: interrupted; resuming from its checkpoint" in rerun.stdout
    resumed = [r["resumed_from_step"] for r in read_metrics(path) if "resumed_from_step" in r]
    assert len(resumed) == 1 and 3 <= resumed[0] < steps, resumed


def _one_error(proc, first_line):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == first_line and len(lines) <= 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupted_rerun_advice_follows_whether_this_run_recorded_its_plan(tmp_path):
    """Stopped before it recorded its plan (its history entry), a --rerun changed nothing: the
    same command is the way on. After, its stages are pending or done anew, and a plain run
    finishes the rerun where the same command would start it over."""
    import socket

    from taylorcal_jax.main import interrupted_message

    wd = str(tmp_path)
    same = "interrupted; run the same command again to resume\n"
    assert interrupted_message(["first"], wd) == same  # no history at all
    workdir_lib.append_history(wd, {"pid": os.getpid() + 1, "host": socket.gethostname()})
    assert interrupted_message(["first"], wd) == same  # an earlier run's entry
    workdir_lib.append_history(wd, {"pid": os.getpid(), "host": socket.gethostname()})
    assert "without --rerun to resume (with it, first would start over)" in (
        interrupted_message(["first"], wd)
    )
    assert interrupted_message([], wd) == same


@pytest.mark.slow
def test_bad_value_is_one_line_exit_2_within_seconds_and_writes_nothing(tmp_path):
    wd = tmp_path / "wd"
    t0 = time.perf_counter()
    proc = cli(*SMOKE, f"--workdir={wd}", "--config.calibration.strategy=bogus")
    assert time.perf_counter() - t0 < 60  # imports included, on a loaded 2-core machine
    _one_error(
        proc,
        "error: calibration.strategy='bogus' is not one of copy, zero_gate, small_gate, "
        "taylor_init, align_only, taylor_calibrate, taylor_calibrate_published",
    )
    assert not wd.exists()
    proc = cli(*SMOKE, f"--workdir={wd}", "--config.calibration.strategy=bogus", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: calibration.strategy=")


@pytest.mark.slow
def test_unknown_field_typo_gets_did_you_mean(tmp_path):
    proc = cli(*SMOKE, f"--workdir={tmp_path / 'wd'}", "--config.calibration.strategi=copy")
    _one_error(
        proc,
        "error: unknown config field calibration.strategi (in --config.calibration.strategi=copy)",
    )
    assert (
        proc.stderr.strip().splitlines()[1] == "hint: did you mean --config.calibration.strategy?"
    )


@pytest.mark.slow
def test_missing_or_broken_config_file_is_one_line(tmp_path):
    wd = tmp_path / "wd"
    proc = cli("--config=configs/tiny_typo.py", f"--workdir={wd}")
    _one_error(proc, "error: config file configs/tiny_typo.py does not exist")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise RuntimeError('no such teacher')\n")
    proc = cli(f"--config={broken}", f"--workdir={wd}")
    _one_error(proc, f"error: --config={broken}: RuntimeError: no such teacher")
    assert not wd.exists()


@pytest.mark.slow
def test_missing_teacher_path_is_named_before_anything_is_written(tmp_path):
    wd = tmp_path / "wd"
    # (its Wikitext source needs the datasets package, which validation names first where it
    # is missing: text from the standard library here)
    proc = cli(
        "--config=configs/qwen2_5_1_5b.py:/nonexistent",
        "--config.data.source=stdlib",
        f"--workdir={wd}",
    )
    _one_error(proc, "error: teacher.path='/nonexistent' does not exist")
    assert not wd.exists()


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_exits_naming_the_holder(tmp_path):
    from test_run_workdir import _hold_lock

    wd = str(tmp_path / "wd")
    os.makedirs(wd)
    holder = _hold_lock(wd)
    try:
        proc = cli(*SMOKE, f"--workdir={wd}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 1
    assert f"is in use by pid {holder.pid} on " in proc.stderr and "(started 20" in proc.stderr
    assert sorted(os.listdir(wd)) == [".lock"]


@pytest.mark.slow
def test_help_and_print_config():
    proc = cli("--help")
    for text in ("Stages (config.stages", "eval_student", "Strategies", "taylor_calibrate"):
        assert text in proc.stdout
    assert "Layer policies (select.policy): uniform, ar, ga_s2" in proc.stdout
    proc = cli("--config=configs/tiny.py", "--print_config", "--config.select.policy=ar")
    assert proc.returncode == 0, proc.stderr
    assert 'select.policy = \'ar\'  # "uniform" | "ar" | "ga_s2"' in proc.stdout
    assert 'mesh.data = 1  # devices on the "data" axis' in proc.stdout
    # a comma list for a tuple field, as people type it (ml_collections alone reads one item)
    proc = cli(
        "--config=configs/tiny.py", "--print_config", "--config.stages=pretrain,eval_teacher"
    )
    assert proc.returncode == 0, proc.stderr
    assert "stages = ('pretrain', 'eval_teacher')  #" in proc.stdout


def test_every_config_docstring_holds_its_command():
    for name in ("tiny.py", "gpu_teacher.py"):
        path = os.path.join(ROOT, "configs", name)
        with open(path) as f:
            text = f.read()
        assert f"python -m taylorcal_jax.main --config=configs/{name}" in text
