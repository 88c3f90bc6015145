"""The workdir: one run at a time (a live holder is named, a dead one's lock taken over),
outputs that appear whole or not at all, and the history of runs in config.json."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from taylorcal_jax.errors import ConfigError, UserError
from taylorcal_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from taylorcal_jax.run.workdir import WorkdirLock
WorkdirLock(sys.argv[1], print).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(workdir):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_holder_names_a_live_holder_and_takes_nothing(tmp_path):
    """What --dry_run reports of a workdir another run holds (it planned as if none did)."""
    wd = str(tmp_path)
    assert workdir_lib.lock_holder(wd) is None  # no lock file
    proc = _hold_lock(wd)
    try:
        holder = workdir_lib.lock_holder(wd)
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert workdir_lib.lock_holder(wd) is None  # a dead holder's file holds nothing
    with workdir_lib.WorkdirLock(wd, print):  # and looking took nothing
        pass


def test_second_run_is_refused_naming_the_holder_then_a_dead_holder_is_taken_over(tmp_path):
    wd = str(tmp_path)
    proc = _hold_lock(wd)
    try:
        with pytest.raises(UserError) as info:
            workdir_lib.WorkdirLock(wd, print).acquire()
        msg = info.value.message
        assert f"in use by pid {proc.pid} on {socket.gethostname()} (started 20" in msg
        assert "another --workdir" in info.value.hint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    with workdir_lib.WorkdirLock(wd, said.append):
        holder = json.load(open(os.path.join(wd, workdir_lib.LOCK_FILE)))
        assert holder["pid"] == os.getpid()
    assert len(said) == 1 and f"taking over the lock of pid {proc.pid}" in said[0]
    assert "no longer running" in said[0]
    assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))  # released on exit
    with workdir_lib.WorkdirLock(wd, said.append):
        pass
    assert len(said) == 1  # a cleanly released lock is not stale


def test_a_look_at_the_lock_does_not_refuse_a_run(tmp_path):
    """--dry_run's lock_holder takes a shared lock for an instant; a run taking the lock at
    that moment waits it out (it was refused, naming the last holder's stale pid)."""
    import fcntl
    import threading

    wd = str(tmp_path)
    path = os.path.join(wd, workdir_lib.LOCK_FILE)
    look = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(look, fcntl.LOCK_SH)  # another open file description: it conflicts
    threading.Timer(0.3, os.close, (look,)).start()  # the look ends, dropping its lock
    with workdir_lib.WorkdirLock(wd, print):
        assert json.load(open(path))["pid"] == os.getpid()


def test_output_dir_and_file_appear_whole_or_not_at_all(tmp_path):
    out = str(tmp_path / "student")
    with workdir_lib.output_dir(out) as tmp:
        open(os.path.join(tmp, "a"), "w").write("old")
    with pytest.raises(RuntimeError), workdir_lib.output_dir(out) as tmp:
        open(os.path.join(tmp, "a"), "w").write("new")
        raise RuntimeError("killed half way")
    assert open(os.path.join(out, "a")).read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["student"]
    path = str(tmp_path / "report.json")
    with pytest.raises(RuntimeError), workdir_lib.output_file(path) as tmp:
        open(tmp, "w").write("{")
        raise RuntimeError("killed half way")
    assert not os.path.exists(path) and sorted(os.listdir(tmp_path)) == ["student"]
    workdir_lib.write_json(path, {"a": 1})
    assert json.load(open(path)) == {"a": 1}


def test_remove_partials_finds_files_and_directories_at_any_depth(tmp_path):
    (tmp_path / "calibration" / "aligned.partial").mkdir(parents=True)
    (tmp_path / "calibration" / "aligned.partial" / "x").write_text("1")
    (tmp_path / "stats.npz.partial").write_text("1")
    (tmp_path / "kept.npz").write_text("1")
    found = workdir_lib.remove_partials(str(tmp_path))
    assert len(found) == 2
    assert sorted(os.listdir(tmp_path)) == ["calibration", "kept.npz"]
    assert os.listdir(tmp_path / "calibration") == []


def test_history_keeps_every_run_and_adopts_a_plain_config_json(tmp_path):
    wd = str(tmp_path)
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump({"stages": ["pretrain"]}, f)  # a resolved config as older runs wrote it
    workdir_lib.append_history(wd, {"command": "second", "config": {"stages": ["eval_teacher"]}})
    runs = workdir_lib.read_history(wd)
    assert runs[0]["config"] == {"stages": ["pretrain"]} and runs[0]["command"] is None
    assert runs[1]["command"] == "second"


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        workdir_lib.check_workdir(str(f))
    with pytest.raises(ConfigError, match="is a file"):
        workdir_lib.check_workdir(str(f / "below"))
    workdir_lib.check_workdir(str(tmp_path / "new" / "deeper"))  # created later, fine
    with pytest.raises(ConfigError, match="is a URL; the workdir must be a directory"):
        workdir_lib.check_workdir("gs://bucket/run")  # it became a local ./gs: folder


@pytest.mark.parametrize("text", ["{not json", "[]", '{"stages": []}', '{"stages": {"a": 1}}'])
def test_a_records_file_of_another_shape_is_one_line(tmp_path, text):
    (tmp_path / workdir_lib.RECORDS_FILE).write_text(text)
    with pytest.raises(UserError, match="stages.json is unreadable"):
        workdir_lib.read_records(str(tmp_path))
