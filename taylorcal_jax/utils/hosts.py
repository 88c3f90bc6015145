"""Several processes (hosts, or one process per GPU) running one program over one mesh.

    initialize(distributed)   jax.distributed.initialize, with the coordinator, the number of
                              processes and this process's id from the environment:
                                JAX_COORDINATOR_ADDRESS  host:port of process 0 (jax reads it)
                                JAX_NUM_PROCESSES        how many processes
                                JAX_PROCESS_ID           this process, 0 .. n-1
                                JAX_LOCAL_DEVICE_IDS     the local devices it owns (jax reads it)
                              Unset ones are left to jax's cluster detection (Cloud TPU pods,
                              SLURM, Open MPI, Kubernetes fill all of them in).
    local_rows(sharding, n)   the rows [start, stop) of an n-row batch that this process's
                              devices hold under `sharding`; a process builds only those
    put_rows(rows, sharding)  the global [n, ...] array from this process's rows (made by
                              `rows(start, stop)`); on one process it equals
                              jax.device_put(rows(0, n), sharding)
    put_held_rows(x, sharding, axis, held)
                              the global array from host array `x` that holds only the rows
                              held = (start, stop, n) of its `axis`, each process sending
                              its devices their rows
    gather_rows(tree)         every row of row-split results on every process (host arrays);
                              the arrays themselves on one process
    to_host(tree)             every array of `tree` whole as a host array, on every process
                              (a collective: every process calls it)
    is_main()                 process 0: the one that prints, logs and writes the workdir
    sync(name)                waits until every process reaches sync(name) (a barrier; a no-op
                              on one process), e.g. so no process reads a file before
                              process 0 has written it
    main_first(fn, name)      fn() on process 0, then on the others (e.g. a cache that
                              process 0 builds and the others read)
    main_value(fn, name)      fn() on process 0 alone, its JSON-able result on every process
                              (one decision, e.g. the run's plan, from process 0's view)

Row ranges: a batch split over mesh axes gives each device a block of rows; the blocks of one
process's devices must be contiguous, which they are when the mesh is laid out from
jax.devices() in order (utils/sharding.make_mesh: devices are numbered process by process)
and its batch axes come last or replicate whole across processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def distributed_args(environ: Mapping[str, str]) -> dict:
    """Keyword arguments of jax.distributed.initialize taken from `environ` (the ones jax does
    not read itself); ValueError on a malformed value."""
    args = {}
    for key, name in ((ENV_NUM_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id")):
        if environ.get(key, "") != "":
            try:
                args[name] = int(environ[key])
            except ValueError as e:
                raise ValueError(f"{key}={environ[key]!r} is not an integer") from e
    if "num_processes" in args and args["num_processes"] < 1:
        raise ValueError(f"{ENV_NUM_PROCESSES} must be positive, got {args['num_processes']}")
    if "process_id" in args and not 0 <= args["process_id"] < args.get("num_processes", 2**31):
        raise ValueError(
            f"{ENV_PROCESS_ID}={args['process_id']} is not in [0, {ENV_NUM_PROCESSES})"
        )
    return args


def initialize(distributed: bool, environ: Mapping[str, str] | None = None) -> None:
    """Starts jax.distributed when `distributed` (config mesh.distributed); before any other
    JAX call. A no-op otherwise."""
    if distributed:
        jax.distributed.initialize(**distributed_args(os.environ if environ is None else environ))


def is_main() -> bool:
    """Whether this is process 0 (always, before or without jax.distributed)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def rows_held(index_map: Iterable[tuple], num_rows: int, axis: int = 0) -> tuple[int, int]:
    """[start, stop) covering the slices along `axis` of `index_map` (one index tuple per
    device, as Sharding.devices_indices_map gives them); ValueError if they leave a gap."""
    covered = np.zeros(num_rows, bool)
    for index in index_map:
        covered[index[axis] if len(index) > axis else slice(None)] = True
    rows = np.flatnonzero(covered)
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if len(rows) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {rows.tolist()} of {num_rows}, not one block: "
            "lay the mesh out from jax.devices() in order"
        )
    return start, stop


def local_rows(sharding, num_rows: int, shape_tail: tuple[int, ...] = ()) -> tuple[int, int]:
    """The rows [start, stop) of a [num_rows, *shape_tail] array that this process's devices
    hold under `sharding`."""
    indices = sharding.addressable_devices_indices_map((num_rows, *shape_tail)).values()
    return rows_held(indices, num_rows)


def put_rows(rows: Callable[[int, int], np.ndarray], sharding, global_shape: tuple[int, ...]):
    """The global array of `global_shape` under `sharding`, this process giving only the rows
    it holds: rows(start, stop) -> host array [stop - start, ...]."""
    start, stop = local_rows(sharding, global_shape[0], tuple(global_shape[1:]))
    local = np.asarray(rows(start, stop))
    if local.shape != (stop - start, *global_shape[1:]):
        raise ValueError(f"rows({start}, {stop}) gave shape {local.shape}")
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def put_held_rows(x, sharding, axis: int = 0, held: tuple[int, int, int] | None = None):
    """The global array under `sharding` of which `x` holds the rows held = (start, stop, n)
    along `axis`: each process passes its devices only the rows they hold, which must lie
    in [start, stop). Without `held`, `x` is the whole array, the same on every process:
    jax.device_put(x, sharding)."""
    if held is None:
        return jax.device_put(x, sharding)
    start, stop, num_rows = held
    if x.shape[axis] != stop - start:
        raise ValueError(f"{x.shape[axis]} rows along axis {axis} for rows [{start}, {stop})")
    global_shape = (*x.shape[:axis], num_rows, *x.shape[axis + 1 :])
    index_map = sharding.addressable_devices_indices_map(global_shape).values()
    a, b = rows_held(index_map, num_rows, axis)
    if not start <= a <= b <= stop:
        raise ValueError(f"this process's devices hold rows [{a}, {b}), not in [{start}, {stop})")
    local = np.asarray(x)[(slice(None),) * axis + (slice(a - start, b - start),)]
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def put_slices(tree, sharding):
    """Every host array of `tree` (the same on every process, leading axis split by
    `sharding`) on the devices, each process sending only the rows its devices hold."""
    return jax.tree.map(lambda x: put_rows(lambda a, b: x[a:b], sharding, np.shape(x)), tree)


def gather_rows(tree):
    """`tree` whole on every process: with several processes each non-fully-replicated array
    becomes the host array of all its rows (an all-gather across processes); with one
    process `tree` itself."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return multihost_utils.process_allgather(tree, tiled=True)


def to_host(tree):
    """Every array of `tree` as a whole host (numpy) array, on every process: an array split
    across processes (np.asarray would fail on it) is all-gathered first, so every process
    must call this at the same point."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(whole, tree)


def sync(name: str) -> None:
    """Blocks until every process has called sync(name) (a no-op on one process). Every
    process must reach the same barriers in the same order."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def main_says(flag: bool) -> bool:
    """Process 0's `flag`, on every process (every process must call it; a barrier too)."""
    return bool(main_value(lambda: bool(flag), "main_says"))


def _broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data` on every process (others pass anything; a collective)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if is_main() else 0)))
    buf = np.frombuffer(data, np.uint8) if is_main() else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def main_value(fn: Callable[[], Any] | None, name: str):
    """fn() computed on process 0 alone (the others pass anything), its result (JSON-able)
    handed to every process, so that all follow one decision made from process 0's view of
    files that may differ between hosts. An exception of fn on process 0 is raised there and,
    as a UserError naming process 0 and `name`, on every other process (with a UserError's
    hint), instead of leaving them waiting at a barrier."""
    if jax.process_count() == 1:
        return fn()
    from taylorcal_jax.errors import UserError  # noqa: PLC0415

    error, data = None, b""
    if is_main():
        try:
            data = json.dumps({"value": fn()}).encode()
        except Exception as e:  # noqa: BLE001 - every process must learn of it
            error = e
            message = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            out = {"error": message, "hint": getattr(e, "hint", ""),
                   "exit_code": getattr(e, "exit_code", UserError.exit_code)}  # fmt: skip
            data = json.dumps(out).encode()
    out = json.loads(_broadcast_bytes(data))
    if error is not None:
        raise error
    if "error" in out:
        failed = UserError(f"process 0 failed in {name}: {out['error']}", out["hint"])
        failed.exit_code = out["exit_code"]  # a ConfigError's 2 on every process
        raise failed
    return out["value"]


def main_first(fn: Callable[[], Any], name: str):
    """fn() on process 0 first, then on every other process: a cache built by fn is built
    once, by process 0, and read by the others. Returns fn()'s result. When fn fails on
    process 0, every process raises (main_value)."""
    if jax.process_count() == 1:
        return fn()
    result = []
    main_value(lambda: result.append(fn()), name)
    return result[0] if is_main() else fn()
