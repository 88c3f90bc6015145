"""Device meshes and shardings: the only module that builds `Mesh` / `NamedSharding`.

Axis names and sizes come from the config (a mapping axis name -> size, at most one size -1
meaning "all remaining devices"); library code names axes only, e.g. P("layers", "data").

Work without a layer axis (statistics, evaluation) is data parallel over every device of the
mesh: `batch_spec(mesh)` shards the leading (batch) axis over all mesh axes together, so a
run uses all its devices whatever the split between "layers" and "data".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec


def resolve_axis_sizes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replaces a single -1 by the remaining factor; checks the product equals num_devices."""
    sizes = {str(k): int(v) for k, v in dict(axes).items()}
    if not sizes:
        raise ValueError("the mesh needs at least one axis, e.g. {'data': -1}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices cannot fill mesh {sizes}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} slots for {num_devices} devices; "
            "set one axis to -1 or make the product match"
        )
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default all) with the named axes of `axes`, in order."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(axes, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def single_device_mesh(names: Sequence[str]) -> Mesh:
    """A mesh of the first device with every axis of size 1 (same program, no sharding)."""
    return make_mesh({n: 1 for n in names}, jax.devices()[:1])


def named(mesh: Mesh, *spec) -> NamedSharding:
    """NamedSharding of `mesh` with PartitionSpec(*spec)."""
    return NamedSharding(mesh, P(*spec))


def axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.shape else 1


def put(tree, mesh: Mesh, *spec):
    """device_put every leaf of `tree` with the same PartitionSpec(*spec) on `mesh`."""
    sharding = named(mesh, *spec)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """PartitionSpec sharding the leading axis over every axis of `mesh` (data parallel)."""
    return P(tuple(mesh.axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding of `batch_spec(mesh)`."""
    return NamedSharding(mesh, batch_spec(mesh))


def pad_to_multiple(n: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the mesh's device count that is >= n (n if no mesh)."""
    size = 1 if mesh is None else mesh.size
    return -(-n // size) * size
