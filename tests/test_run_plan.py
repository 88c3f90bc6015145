"""The runner on three small stages: skip, rerun exactly what changed, resume, refuse unknowns.

Stages (files in the workdir): first (reads eval.seed) -> second (reads eval.num_sequences,
checkpoints its progress) -> third (reads select.seed). Their results are functions of
their settings and inputs, so every test can say what the outputs must be.
"""

import dataclasses
import io
import os

import numpy as np
import pytest

from taylorcal_jax.errors import ConfigError
from taylorcal_jax.run import fields, runner
from taylorcal_jax.run import workdir as workdir_lib
from taylorcal_jax.run.console import Console
from taylorcal_jax.run.plan import Stage
from taylorcal_jax.utils.checkpoint import TrainCheckpointer

CHECKPOINT_EVERY = 10  # steps of stage "second"


class Interrupted(Exception):
    """Stands in for a crash in the middle of a stage."""


def _read(ctx, name):
    with open(ctx.path(name)) as f:
        return int(f.read())


class Stages:
    """A registry whose stages count their calls and can crash once, mid-way."""

    def __init__(self):
        self.calls = {"first": 0, "second": 0, "third": 0}
        self.crash_second_after = None  # steps done before second crashes
        self.resumed_from = None

    def first(self, ctx):
        self.calls["first"] += 1
        workdir_lib.write_bytes(ctx.path("first.txt"), str(ctx.config.eval.seed + 10).encode())
        return {"value": ctx.config.eval.seed + 10}

    def second(self, ctx):
        """Sums 1..num_sequences plus first, one step at a time, with an orbax checkpoint
        every CHECKPOINT_EVERY steps (as the training loop keeps them)."""
        self.calls["second"] += 1
        start = {"step": np.asarray(0), "total": np.asarray(_read(ctx, "first.txt"))}
        with TrainCheckpointer(ctx.path("second_ckpt")) as ckpt:  # creates the directory
            state = ckpt.restore_or(start)
            step, total = int(state["step"]), int(state["total"])
            self.resumed_from = step
            for s in range(step, ctx.config.eval.num_sequences):
                if self.crash_second_after is not None and s == self.crash_second_after:
                    self.crash_second_after = None
                    with open(ctx.path("second.txt") + workdir_lib.PARTIAL, "w") as f:
                        f.write("half")  # a partial output left behind
                    raise Interrupted
                total += s + 1
                if (s + 1) % CHECKPOINT_EVERY == 0:
                    ckpt.save(s + 1, {"step": np.asarray(s + 1), "total": np.asarray(total)})
        workdir_lib.write_bytes(ctx.path("second.txt"), str(total).encode())
        return {"value": total}

    def third(self, ctx):
        self.calls["third"] += 1
        value = _read(ctx, "second.txt") * 100 + ctx.config.select.seed
        workdir_lib.write_bytes(ctx.path("third.txt"), str(value).encode())
        return {"value": value}

    def registry(self):
        return {
            "first": Stage(
                "first", self.first, "writes eval.seed + 10", ("eval.seed",), lambda c: (),
                outputs=("first.txt",),
            ),
            "second": Stage(
                "second", self.second, "adds 1..eval.num_sequences to first",
                ("eval.num_sequences",), lambda c: ("first",),
                outputs=("second.txt",), checkpoints=("second_ckpt",),
                checkpoint_mesh_axes=("layers",),
            ),
            "third": Stage(
                "third", self.third, "second * 100 + select.seed", ("select.seed",),
                lambda c: ("second",), outputs=("third.txt",),
            ),
        }  # fmt: skip


def _config(stages=("first", "second", "third"), **changes):
    c = fields.defaults()
    c.stages = stages
    c.progress = False
    for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _run(stages_obj, config, workdir, **options):
    out = io.StringIO()
    results = runner.run(config, workdir, stages_obj.registry(), console=Console(out), **options)
    return results, out.getvalue()


def _expected(seed=0, num_sequences=128, select_seed=1):
    second = seed + 10 + num_sequences * (num_sequences + 1) // 2
    return seed + 10, second, second * 100 + select_seed


def _values(workdir):
    return tuple(
        int(open(os.path.join(workdir, f"{n}.txt")).read()) for n in ("first", "second", "third")
    )  # noqa: E501


def _crashed_in_second(tmp_path, after: int, **options):
    """(workdir, Stages) of a run whose stage "second" crashed after `after` steps."""
    wd = str(tmp_path / "wd")
    s = Stages()
    s.crash_second_after = after
    with pytest.raises(Interrupted):
        _run(s, _config(), wd, **options)
    return wd, s


def test_fresh_run_then_a_rerun_skips_everything(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    results, out = _run(s, _config(), wd)
    assert _values(wd) == _expected()
    assert results["third"]["value"] == _expected()[2]
    assert "[2/3] second: adds 1..eval.num_sequences to first" in out
    assert out.count("run: not run yet") == 3 and out.count("done in") == 3
    assert "summary" in out and "wall time" in out
    records = workdir_lib.read_records(wd)
    assert {r["status"] for r in records.values()} == {"done"}
    assert records["second"]["settings"] == {"eval.num_sequences": 128}

    results, out = _run(s, _config(), wd)
    assert s.calls == {"first": 1, "second": 1, "third": 1}
    assert out.count("skipped (done, settings unchanged)") == 3
    assert results["third"]["value"] == _expected()[2]  # from the record
    runs = workdir_lib.read_history(wd)
    assert len(runs) == 2 and runs[0]["config"]["eval"]["num_sequences"] == 128
    assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))  # released


def test_changed_setting_reruns_exactly_the_affected_stages(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    _run(s, _config(), wd)
    _, out = _run(s, _config(eval__num_sequences=5), wd)
    assert s.calls == {"first": 1, "second": 2, "third": 2}
    assert "[1/3] first: skipped (done, settings unchanged)" in out
    assert "run: settings changed: eval.num_sequences 128 -> 5" in out
    assert "run: inputs changed: second" in out
    assert _values(wd) == _expected(num_sequences=5)
    # Only the last stage reads select.seed.
    _, out = _run(s, _config(eval__num_sequences=5, select__seed=7), wd)
    assert s.calls == {"first": 1, "second": 2, "third": 3}
    assert _values(wd) == _expected(num_sequences=5, select_seed=7)


def test_a_stage_reading_fewer_inputs_says_which_it_no_longer_reads(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    both = s.registry()
    both["third"] = dataclasses.replace(both["third"], inputs=lambda c: ("first", "second"))
    runner.run(_config(), wd, both, console=Console(io.StringIO()))
    out = io.StringIO()
    runner.run(_config(), wd, s.registry(), console=Console(out), dry_run=True)
    assert "run: inputs changed: no longer reads first" in out.getvalue()


def test_a_field_a_stage_ignores_since_its_record_reruns_nothing(tmp_path):
    """A record made while a stage read a field it now ignores (a newer `ignores`, or one that
    depends on the config) stands for this run's settings: nothing reruns, the field's value
    no longer matters, and a field still read reruns as before."""
    wd = str(tmp_path / "wd")
    s = Stages()
    first = s.registry()["first"]
    reads_eval = {**s.registry(), "first": dataclasses.replace(first, reads=("eval",))}
    runner.run(_config(), wd, reads_eval, console=Console(io.StringIO()))
    ignoring = {
        **s.registry(),
        "first": dataclasses.replace(first, reads=("eval",), ignores=lambda c: ("eval.split",)),
    }

    def plan(**changes):
        out = io.StringIO()
        runner.run(_config(**changes), wd, ignoring, dry_run=True, console=Console(out))
        return out.getvalue()

    assert plan().count("skip: done, settings unchanged") == 3
    assert plan(eval__split="test").count("skip: done, settings unchanged") == 3
    out = plan(eval__seed=4)
    assert "run: settings changed: eval.seed 0 -> 4" in out and out.count("run: ") == 3
    # the stage run again (its output lost) records the fingerprint it carried over with its
    # new settings; that record stands too (the later stages, run again on its new output,
    # are done with the same fingerprints)
    os.remove(os.path.join(wd, "first.txt"))
    runner.run(_config(), wd, ignoring, console=Console(io.StringIO()))
    assert s.calls == {"first": 2, "second": 2, "third": 2}
    assert plan().count("skip: done, settings unchanged") == 3


def test_rerun_flag_and_missing_outputs(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    _run(s, _config(), wd)
    _, out = _run(s, _config(), wd, rerun=["second"])
    assert s.calls == {"first": 1, "second": 2, "third": 2}
    assert "run: --rerun" in out and "run: an input is rerun (--rerun)" in out
    os.remove(os.path.join(wd, "third.txt"))
    _, out = _run(s, _config(), wd)
    assert s.calls["third"] == 3 and "run: outputs missing: third.txt" in out
    _, out = _run(s, _config(), wd, rerun=["all"])
    assert s.calls == {"first": 2, "second": 3, "third": 4} and out.count("run: --rerun") == 3
    with pytest.raises(ConfigError, match="--rerun names fourth"):
        _run(s, _config(), wd, rerun=["fourth"])


def test_consumers_of_outputs_made_again_run_again(tmp_path):
    """A stage made again with unchanged settings (its outputs deleted, or --rerun in a run
    that lists it alone) has new outputs: every stage that used the old ones runs again,
    listed in that run or not (on a GPU, "unchanged" outputs differ in rounding)."""
    wd = str(tmp_path / "wd")
    s = Stages()
    _run(s, _config(), wd)
    os.remove(os.path.join(wd, "second.txt"))
    _, out = _run(s, _config(), wd)
    assert "run: outputs missing: second.txt" in out
    assert "run: an input is made again: second" in out
    assert s.calls == {"first": 1, "second": 2, "third": 2}
    # first alone, rerun: second and third, not listed, are left pending for the next run
    _, out = _run(s, _config(stages=("first",)), wd, rerun=["first"])
    records = workdir_lib.read_records(wd)
    assert [records[n]["status"] for n in ("first", "second", "third")] == [
        "done",
        "pending",
        "pending",
    ]
    _, out = _run(s, _config(), wd)
    assert out.count("run: an input was made again by a run that did not list it") == 2
    assert s.calls == {"first": 2, "second": 3, "third": 3} and _values(wd) == _expected()
    _, out = _run(s, _config(), wd)
    assert out.count("skipped (done, settings unchanged)") == 3


def test_an_interrupted_consumer_of_remade_outputs_restarts_instead_of_resuming(tmp_path):
    """Its checkpoint was made from the outputs being replaced: it starts over, whether its
    producer runs again in the same run or in an earlier run that did not list it."""
    wd, s = _crashed_in_second(tmp_path, after=50)  # a checkpoint at step 50
    os.remove(os.path.join(wd, "first.txt"))
    _, out = _run(s, _config(), wd)
    assert "run: failed last time; an input is made again (first): restarting" in out
    assert s.resumed_from == 0 and _values(wd) == _expected()
    wd, s = _crashed_in_second(tmp_path / "unlisted", after=50)
    _run(s, _config(stages=("first",)), wd, rerun=["first"])
    assert workdir_lib.read_records(wd)["second"]["status"] == "pending"
    _, out = _run(s, _config(), wd)
    assert "run: an input was made again by a run that did not list it" in out
    assert s.resumed_from == 0 and _values(wd) == _expected()


def test_a_restart_cut_short_before_it_is_not_resumed_next_time(tmp_path, monkeypatch):
    """A run planning to restart an interrupted stage (its input made again) and stopped
    before reaching it leaves it pending: the next run, which sees the input done, must not
    resume the checkpoint made from the old input."""
    from taylorcal_jax.utils import interrupts

    wd, s = _crashed_in_second(tmp_path, after=50)  # a checkpoint at step 50
    os.remove(os.path.join(wd, "first.txt"))
    first = s.first

    def first_then_ctrl_c(ctx):
        result = first(ctx)
        monkeypatch.setattr(interrupts, "requested", lambda: True)  # during its last call
        return result

    s.first = first_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        _run(s, _config(), wd)
    monkeypatch.setattr(interrupts, "requested", lambda: False)
    s.first = first
    assert workdir_lib.read_records(wd)["second"]["status"] == "pending"
    _run(s, _config(), wd)
    assert s.resumed_from == 0 and _values(wd) == _expected()


def test_a_rerun_cut_short_is_finished_by_the_next_run(tmp_path):
    # --rerun=first reruns its consumers too; a crash in second leaves third to do, and the
    # next plain run (no --rerun) must still run it: its record says "pending", not "done"
    wd = str(tmp_path / "wd")
    s = Stages()
    _run(s, _config(), wd)
    s.crash_second_after = 50
    with pytest.raises(Interrupted):
        _run(s, _config(), wd, rerun=["first"])
    records = workdir_lib.read_records(wd)
    assert [records[n]["status"] for n in ("first", "second", "third")] == [
        "done",
        "failed",
        "pending",
    ]
    _, out = _run(s, _config(), wd)
    assert "resume: failed last time" in out
    assert "run: planned by an earlier run that stopped before it" in out
    assert s.calls == {"first": 2, "second": 3, "third": 2} and _values(wd) == _expected()
    _, out = _run(s, _config(), wd)
    assert out.count("skipped (done, settings unchanged)") == 3


def test_a_checkpoint_shaped_by_another_mesh_is_not_resumed(tmp_path):
    # a stage whose state is shaped by the "layers" axis (layers padded to its multiple):
    # resuming on other sizes is refused before any work, naming both and the two ways on
    wd, s = _crashed_in_second(tmp_path, after=50)
    records = workdir_lib.read_records(wd)
    here = records["second"]["mesh"]
    assert list(here) == ["layers"] and here["layers"] >= 1
    records["second"]["mesh"] = {"layers": here["layers"] + 1}  # as saved on another mesh
    workdir_lib.write_records(wd, records)
    for options in ({"dry_run": True}, {}):
        with pytest.raises(ConfigError, match="checkpoint saved at mesh.layers=") as e:
            _run(s, _config(), wd, **options)
        assert "--rerun=second" in e.value.hint
    assert s.calls["second"] == 1
    _, out = _run(s, _config(), wd, rerun=["second"])
    assert s.resumed_from == 0 and _values(wd) == _expected()


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path):
    wd, s = _crashed_in_second(tmp_path, after=50)
    assert workdir_lib.read_records(wd)["second"]["status"] == "failed"
    assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))
    _, out = _run(s, _config(), wd)
    assert "resume: failed last time; resuming from its checkpoint" in out
    assert "note: removed 1 partial outputs of an interrupted run" in out
    assert s.resumed_from == 50
    assert _values(wd) == _expected()  # equal to an uninterrupted run
    assert not [p for p in os.listdir(wd) if p.endswith(workdir_lib.PARTIAL)]
    # A kill -9 cannot mark the record: it stays "running", and the stage resumes as well.
    s.crash_second_after = 20
    with pytest.raises(Interrupted):
        _run(s, _config(), wd, rerun=["second"])
    records = workdir_lib.read_records(wd)
    records["second"]["status"] = "running"
    workdir_lib.write_records(wd, records)
    _, out = _run(s, _config(), wd)
    assert "resume: interrupted; resuming from its checkpoint" in out and s.resumed_from == 20
    assert _values(wd) == _expected()
    # Interrupted before its first checkpoint: its (empty) checkpoint directory is there, but
    # there is nothing to resume from, and the plan says so.
    s.crash_second_after = CHECKPOINT_EVERY - 1
    with pytest.raises(Interrupted):
        _run(s, _config(), wd, rerun=["second"])
    assert os.path.isdir(os.path.join(wd, "second_ckpt"))
    _, out = _run(s, _config(), wd, dry_run=True)
    assert "run: failed last time; restarting" in out and "resume:" not in out
    records = workdir_lib.read_records(wd)
    records["second"]["status"] = "running"  # as a kill -9 leaves it
    workdir_lib.write_records(wd, records)
    _, out = _run(s, _config(), wd)
    assert "run: interrupted; restarting" in out and "resume:" not in out
    assert s.resumed_from == 0 and _values(wd) == _expected()
    # Changed settings never resume from a checkpoint made under the old ones.
    s.crash_second_after = CHECKPOINT_EVERY + 2
    with pytest.raises(Interrupted):
        _run(s, _config(eval__num_sequences=16), wd)
    _, out = _run(s, _config(eval__num_sequences=17), wd)
    assert "run: settings changed: eval.num_sequences 16 -> 17" in out
    assert s.resumed_from == 0 and _values(wd) == _expected(num_sequences=17)


def test_refuses_outputs_without_a_record_and_stale_unlisted_inputs(tmp_path):
    wd = str(tmp_path / "wd")
    os.makedirs(wd)
    with open(os.path.join(wd, "first.txt"), "w") as f:
        f.write("99")
    s = Stages()
    with pytest.raises(ConfigError, match="no record of the settings"):
        _run(s, _config(), wd)
    _run(s, _config(), wd, rerun=["first"])
    assert _values(wd) == _expected()
    # third alone, under an eval.num_sequences that second's outputs were not made with.
    with pytest.raises(ConfigError, match=r"needs the outputs of 'second', which were made under"):
        _run(s, _config(stages=("third",), eval__num_sequences=3), wd)
    _, out = _run(s, _config(stages=("third",), select__seed=2), wd)
    assert _values(wd)[2] == _expected(select_seed=2)[2]


def test_plan_errors_come_before_any_write(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    with pytest.raises(ConfigError, match="'third' needs the outputs of 'second'; run 'second'"):
        _run(s, _config(stages=("first", "third")), wd)
    with pytest.raises(ConfigError, match="'second' is listed after it"):
        _run(s, _config(stages=("first", "third", "second")), wd)
    with pytest.raises(ConfigError, match="unknown stage 'thrid'.*"):
        _run(s, _config(stages=("first", "thrid")), wd)
    assert not os.path.exists(wd)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    wd = str(tmp_path / "wd")
    s = Stages()
    _run(s, _config(), wd)
    before = sorted(os.listdir(wd))
    results, out = _run(s, _config(select__seed=3), wd, dry_run=True)
    assert results == {} and sorted(os.listdir(wd)) == before
    assert "plan for" in out and "1 of 3 stages to run" in out
    assert "skip: done, settings unchanged" in out
    assert "run: settings changed: select.seed 1 -> 3" in out
    assert s.calls == {"first": 1, "second": 1, "third": 1}


def test_a_stage_not_needed_reports_no_result_from_other_settings(tmp_path):
    # "third" has nothing to do under select.seed 99: the run reports it skipped, not the value
    # its last run (under select.seed 1) recorded
    s = Stages()
    registry = s.registry()
    registry["third"] = dataclasses.replace(
        registry["third"], not_needed=lambda c: "seed 99" if c.select.seed == 99 else ""
    )
    s.registry = lambda: registry
    wd = str(tmp_path / "wd")
    results, _ = _run(s, _config(), wd)
    assert results["third"]["value"] == _expected()[2]
    results, out = _run(s, _config(select__seed=99), wd)
    assert results["third"] == {"skipped": "seed 99"}
    with open(os.path.join(wd, "summary.md")) as f:
        assert f"| value | {_expected()[2]} |" not in f.read().split("## third")[1]
