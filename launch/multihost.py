"""Starts one process per GPU (or per group of CPU devices) on this host, all running one
command as one jax.distributed program, and waits for them.

    python launch/multihost.py --processes=4 -- \
        python -m taylorcal_jax.main --config=configs/qwen2_5_1_5b_pod.py:/ckpt/Qwen2.5-1.5B \
        --config.mesh.distributed=True --workdir=/tmp/qwen_pod

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>, JAX_NUM_PROCESSES=n,
JAX_PROCESS_ID=i (read by taylorcal_jax/utils/hosts.py) and, with --gpus_per_process=g (GPU
mode, the default), CUDA_VISIBLE_DEVICES = GPUs i*g .. i*g+g-1 and NCCL_NVLS_ENABLE=0
(NVLink multicast off: it fails on some shared machines and gains little here). With
--cpu_devices_per_process=k, each process instead gets k CPU devices
(--xla_force_host_platform_device_count=k) and gloo cross-process collectives: the same
program runs on a laptop, for testing. The first process to fail stops the others; the exit
code is the first non-zero one. SIGTERM to this launcher (a scheduler's preemption) goes on to
every process, and the launcher waits for them to save and stop (their preemption notice
agrees on the step; once one has ended, the others get TERM_GRACE_S); a second SIGTERM stops
them at once. Without that the processes kept running with no launcher.

TPU pod slices need no spawner: every worker of the slice runs the same command, and
jax.distributed finds the coordinator, process count and id from the TPU environment, e.g.
for a v5p-32 slice (4 hosts x 4 chips):

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='
        cd taylorcal_jax && python -m taylorcal_jax.main \
            --config=configs/qwen2_5_3b_pod.py:/mnt/ckpt/Qwen2.5-3B \
            --workdir=/mnt/shared/qwen2_5_3b_pod'

(the workdir must be a directory every host sees, for the orbax checkpoints and the workdir's
records, on a file system with POSIX locks and atomic renames, e.g. NFS or Filestore mounted
at /mnt/shared; a gs:// URL is refused). On other clusters (SLURM, Open MPI, Kubernetes) jax
detects the same from their environment: run the command once per process with
mesh.distributed=True.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from taylorcal_jax.utils.hosts import ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict,
    index: int,
    count: int,
    port: int,
    *,
    gpus_per_process: int,
    cpu_devices_per_process: int,
) -> dict:
    """The environment of process `index` of `count` (a pure function of its arguments)."""
    env = dict(base)
    env.update(
        {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            ENV_NUM_PROCESSES: str(count),
            ENV_PROCESS_ID: str(index),
            "NCCL_NVLS_ENABLE": "0",
        }
    )
    if cpu_devices_per_process:
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={cpu_devices_per_process}")
        env.update(
            XLA_FLAGS=" ".join(flags),
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        )
    else:
        first = index * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(g) for g in range(first, first + gpus_per_process)
        )
    return env


TERM_GRACE_S = 120  # after a SIGTERM, how long the others may go on once one has ended


def launch(command, count: int, *, gpus_per_process=1, cpu_devices_per_process=0) -> int:
    """Runs `command` in `count` processes; returns the first non-zero exit code, else 0.
    After a SIGTERM: the code of a process that had failed before it, else 128 + SIGTERM."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    signals: list[int] = []  # the SIGTERMs received
    signalled: set[int] = set()  # pids sent the first one
    failed_before: list[int] = []  # codes of processes failed when the first one came

    def stop(p) -> None:
        """After one SIGTERM: SIGTERM once to a live process (it saves and stops); after two:
        SIGKILL (the rerun resumes from the last periodic checkpoint)."""
        if p.poll() is not None:
            return
        if len(signals) > 1:
            p.kill()
        elif p.pid not in signalled:
            signalled.add(p.pid)
            p.send_signal(signal.SIGTERM)

    def forward(signum, frame):
        del frame
        if not signals:
            failed_before.extend(c for c in (p.poll() for p in procs) if c not in (None, 0))
        signals.append(signum)
        for p in procs:
            stop(p)

    # installed before any start and kept until every process is gone: none is left behind
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        try:
            for i in range(count):
                if signals:
                    break
                env = process_env(
                    os.environ,
                    i,
                    count,
                    port,
                    gpus_per_process=gpus_per_process,
                    cpu_devices_per_process=cpu_devices_per_process,
                )
                procs.append(subprocess.Popen(command, env=env))
                if signals:  # it came while this process was being started
                    stop(procs[-1])
            stopped_at = None  # when the first process ended after a SIGTERM
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if all(c is not None for c in codes) or (failed and not signals):
                    break
                if signals and any(c is not None for c in codes):
                    # the others save at the same step; one stuck (waiting on a collective
                    # the ended one never joins) is stopped after TERM_GRACE_S
                    stopped_at = stopped_at or time.monotonic()
                    if time.monotonic() - stopped_at > TERM_GRACE_S:
                        break
                time.sleep(0.2)
        except KeyboardInterrupt:
            failed = [130]
        for p in procs:
            if p.poll() is None and signals:
                p.kill()  # TERM_GRACE_S is out
            elif p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if signals:
        return failed_before[0] if failed_before else 128 + signal.SIGTERM
    return failed[0] if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--gpus_per_process", type=int, default=1, help="GPUs each one sees")
    parser.add_argument(
        "--cpu_devices_per_process",
        type=int,
        default=0,
        help="run on CPU devices instead, this many per process (gloo collectives)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.processes < 1 or args.gpus_per_process < 1 or args.cpu_devices_per_process < 0:
        parser.error("--processes and --gpus_per_process must be positive")
    return launch(
        command,
        args.processes,
        gpus_per_process=args.gpus_per_process,
        cpu_devices_per_process=args.cpu_devices_per_process,
    )


if __name__ == "__main__":
    sys.exit(main())
