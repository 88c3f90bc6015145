"""Several processes: the environment each gets, the rows each builds, and one real run of two
processes (2 CPU devices each, gloo collectives) that equals one process."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import multihost  # launch/multihost.py
import numpy as np
import pytest

from taylorcal_jax.utils import hosts, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distributed_args_from_the_environment():
    env = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3", "JAX_COORDINATOR_ADDRESS": "h:1"}
    assert hosts.distributed_args(env) == {"num_processes": 4, "process_id": 3}
    assert hosts.distributed_args({}) == {}  # left to jax's cluster detection
    for bad, match in [
        ({"JAX_NUM_PROCESSES": "two"}, "not an integer"),
        ({"JAX_NUM_PROCESSES": "0"}, "must be positive"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in \[0, JAX_NUM_PROCESSES\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            hosts.distributed_args(bad)


def test_process_env_of_the_local_spawner():
    gpu = multihost.process_env(
        {"PATH": "/bin"}, 1, 4, 1234, gpus_per_process=2, cpu_devices_per_process=0
    )
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3" and gpu["NCCL_NVLS_ENABLE"] == "0"
    assert gpu["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (gpu["JAX_NUM_PROCESSES"], gpu["JAX_PROCESS_ID"], gpu["PATH"]) == ("4", "1", "/bin")
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_other=1"}
    cpu = multihost.process_env(base, 0, 2, 1, gpus_per_process=1, cpu_devices_per_process=3)
    assert cpu["XLA_FLAGS"] == "--xla_other=1 --xla_force_host_platform_device_count=3"
    assert cpu["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and "CUDA_VISIBLE_DEVICES" not in cpu


def _rows_of_fake_processes(mesh_axes, spec, num_rows, num_processes):
    """The rows each group of len(devices) / num_processes consecutive devices (one fake
    process each, as jax numbers the devices of real processes) holds."""
    mesh = sharding.make_mesh(mesh_axes)
    index_map = sharding.named(mesh, *spec).devices_indices_map((num_rows, 5))
    per = len(jax.devices()) // num_processes
    groups = [jax.devices()[i * per : (i + 1) * per] for i in range(num_processes)]
    return [hosts.rows_held([index_map[d] for d in g], num_rows) for g in groups]


def test_each_process_holds_one_block_of_rows():
    # evaluation batches over every device: process i of 2 gets rows 8i .. 8i + 7 of 16
    everything = sharding.batch_spec(sharding.make_mesh({"layers": 2, "data": 2, "fsdp": 2}))
    rows = _rows_of_fake_processes({"layers": 2, "data": 2, "fsdp": 2}, everything, 16, 2)
    assert rows == [(0, 8), (8, 16)]
    assert _rows_of_fake_processes({"data": 8}, ("data",), 16, 4) == [
        (0, 4),
        (4, 8),
        (8, 12),
        (12, 16),
    ]
    # training batches over (data, fsdp) with "layers" outermost across processes: each
    # process holds every row (its layers group sees the whole batch)
    train = (("data", "fsdp"),)
    assert _rows_of_fake_processes({"layers": 2, "data": 2, "fsdp": 2}, train, 8, 2) == [
        (0, 8),
        (0, 8),
    ]
    with pytest.raises(ValueError, match="not one block"):
        hosts.rows_held([(slice(0, 2),), (slice(4, 6),)], 8)


def test_one_process_puts_todays_arrays_bit_identically():
    mesh = sharding.make_mesh({"layers": 2, "data": 2, "fsdp": 2})
    rows = sharding.batch_sharding(mesh)
    x = np.random.default_rng(0).integers(0, 99, size=(16, 5)).astype(np.int32)
    got = hosts.put_slices(x, rows)
    want = jax.device_put(x, rows)
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert hosts.local_rows(rows, 16, (5,)) == (0, 16) and hosts.is_main()


def _two_processes(worker: str, out, *, devices_each: int, timeout: int) -> None:
    """tests/<worker> run as 2 processes of `devices_each` CPU devices (launch/multihost.py),
    given `out` as its argument; they must succeed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    launcher = os.path.join(ROOT, "launch", "multihost.py")
    cmd = [sys.executable, launcher, "--processes=2", f"--cpu_devices_per_process={devices_each}"]
    cmd += ["--", sys.executable, os.path.join(ROOT, "tests", worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def test_two_processes_give_the_perplexity_of_one(tmp_path):
    """2 processes x 2 CPU devices (params split over "fsdp" across them) against this one
    process's 8 devices: the same NLL and statistics up to float32 summation order (rtol
    1e-6 and 1e-5)."""
    import multihost_worker  # noqa: PLC0415  tests/multihost_worker.py

    one = multihost_worker.perplexity_on_all_devices()
    out = tmp_path / "two.json"
    _two_processes("multihost_worker.py", out, devices_each=2, timeout=240)
    two = json.loads(out.read_text())
    assert (two["processes"], two["devices"]) == (2, 4)
    assert two["tokens"] == one["tokens"] == 11 * 11 - 4
    np.testing.assert_allclose(two["nll"], one["nll"], rtol=1e-6)
    np.testing.assert_allclose(two["distance_lh"], one["distance_lh"], rtol=1e-5)
    np.testing.assert_allclose(two["x_sum"], one["x_sum"], rtol=1e-5)


def test_process_0_decides_for_all_and_its_failure_reaches_every_process(tmp_path):
    """hosts.main_value hands process 0's result to both processes; when main_first's fn fails
    on process 0, process 1 raises too (it waited at a barrier until JAX's timeout before)."""
    out = tmp_path / "seen"
    _two_processes("hosts_worker.py", out, devices_each=1, timeout=120)
    seen = [json.loads((tmp_path / f"seen.{i}").read_text()) for i in range(2)]
    assert [s["value"] for s in seen] == [{"made by": 0}] * 2
    assert [s["first"] for s in seen] == ["built", "read"]  # process 0's fn ran first
    assert seen[0]["error"] == "no text in the source"
    assert seen[1]["error"] == "process 0 failed in corpus: no text in the source"
    assert seen[0]["hint"] == seen[1]["hint"] == "give it some"


def test_a_batch_built_by_rows_is_the_whole_batch_cut():
    from taylorcal_jax.data import packing  # noqa: PLC0415
    from taylorcal_jax.train import loop  # noqa: PLC0415

    stream = np.arange(500, dtype=np.int32)
    whole = packing.train_batch(stream, 8, 10, 1, 5)
    np.testing.assert_array_equal(packing.train_batch(stream, 8, 10, 1, 5, 2, 6), whole[2:6])
    rows = lambda p, a, b: {"t": packing.train_batch(stream, 8, 10, 1, p, a, b)}  # noqa: E731
    source = loop.StreamBatches.from_rows(rows, 8)
    np.testing.assert_array_equal(source.fn(5)["t"], whole)
    np.testing.assert_array_equal(source.take(4, 2, (6, 8))["t"][1], whole[6:8])
    # one process holds every row of every batch split, and places them as device_put does
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    task = loop.Task(
        loss_fn=None,
        labels=None,
        groups={},
        clip=None,
        batch_spec={"t": sharding.train_batch_spec(mesh)},
    )
    assert loop.process_rows(task, mesh, 8) == (0, 8)
    placed = loop.place_batch(task, mesh, source.take(4, 2, (0, 8)), stacked=True, held=(0, 8, 8))
    want = jax.device_put(source.take(4, 2)["t"], sharding.named(mesh, None, ("data", "fsdp")))
    assert placed["t"].sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(placed["t"]), np.asarray(want))
    with pytest.raises(ValueError, match="rows along axis 1"):
        loop.place_batch(task, mesh, source.take(4, 2, (0, 4)), stacked=True, held=(0, 8, 8))


def test_a_preemption_notice_to_one_process_stops_both_at_the_same_call(tmp_path):
    """SIGTERM reaches jax.distributed's preemption service (it replaces the command line's
    handler); `interrupts.requested()` turns true on both processes at one call after it, so
    the training loop's collective save is reached by both, and the exit status is 143."""
    out = tmp_path / "stopped"
    _two_processes("multihost_preempt_worker.py", out, devices_each=1, timeout=240)
    got = [json.loads((tmp_path / f"stopped.{i}").read_text()) for i in range(2)]
    assert got[0] == got[1], got
    assert got[0]["stopped"] is not None and got[0]["stopped"] > 5
    assert got[0]["status"] == 128 + signal.SIGTERM


_SAVING_CHILD = """
import os, signal, sys, time
out = sys.argv[1] + "." + os.environ["JAX_PROCESS_ID"]
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
open(out + ".ready", "w").close()
deadline = time.monotonic() + 120  # an orphan (the launcher gone) ends by itself
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # saving its step; a second signal would show in `got`
open(out, "w").write(str(len(got)))
sys.exit(128 + signal.SIGTERM)
"""


def _launch_saving_children(tmp_path, child: str):
    """(launcher process, output prefix) of launch/multihost.py running `child` as 2 processes,
    once both are ready for a signal."""
    launcher = os.path.join(ROOT, "launch", "multihost.py")
    out = str(tmp_path / "child")
    cmd = [sys.executable, launcher, "--processes=2", "--cpu_devices_per_process=1"]
    proc = subprocess.Popen([*cmd, "--", sys.executable, "-c", child, out])
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{out}.{i}.ready") for i in range(2)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc, out


def test_sigterm_to_the_launcher_reaches_every_process_once_and_waits_for_them(tmp_path):
    """A scheduler's SIGTERM reaches the launcher alone: it passes it on to each process once
    and waits while they save (before, the launcher died and left them running)."""
    proc, out = _launch_saving_children(tmp_path, _SAVING_CHILD)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for i in range(2):
        with open(f"{out}.{i}") as f:
            assert f.read() == "1"  # saved, after exactly one signal


def test_a_second_sigterm_stops_every_process_at_once(tmp_path):
    """The first SIGTERM lets the processes save; a second one (the scheduler's patience is
    out) stops them without waiting: the rerun resumes from the last periodic checkpoint."""
    slow = _SAVING_CHILD.replace("time.sleep(1.0)", "time.sleep(60.0)")
    proc, out = _launch_saving_children(tmp_path, slow)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # waiting while they save
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10
    assert not any(os.path.exists(f"{out}.{i}") for i in range(2))  # stopped mid-save
