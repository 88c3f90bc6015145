"""Device meshes and shardings: the only module that builds `Mesh` / `NamedSharding`.

Axis names and sizes come from the config (a mapping axis name -> size, at most one size -1
meaning "all remaining devices"); library code names axes only, e.g. P("layers", "data").

Work without a layer axis (statistics, evaluation, layer scoring) is data parallel over every
device of the mesh: `batch_spec(mesh)` shards the leading (batch) axis over all mesh axes
together, so a run uses all its devices whatever the split between "layers", "data" and "fsdp".

Parameter sharding (FSDP, ZeRO-3 style) over the "fsdp" axis only: `param_spec(mesh)` gives
every leaf of size >= 2 along some axis a PartitionSpec splitting its largest axis divisible
by the fsdp size over "fsdp" (ties: the first such axis), so each device stores 1/fsdp of the
params and, in training, of the optimiser state (whose leaves have the params' shapes; the
rule reads shapes only, so one function places params, Adam moments and any extra alike).
"data" replicates: it is the axis that may cross slow links (between hosts), where gathering
weights every step would cost most. Training batches split over ("data", "fsdp")
(`train_batch_spec`), so every fsdp shard also works on its own rows; the SPMD partitioner
inserts the weight all-gathers and gradient reduce-scatters.

Forward passes under `shard_map` (statistics, evaluation, scoring, and the student and teacher
of distillation stage 2) take the params with their fsdp specs and gather them one module at a
time inside each device's program (`ParamLayout`, held by `Transformer.param_layout`): the
embedding, each decoder layer, the final norm and the LM head are all-gathered just before
they run, so a device holds its shards plus one module's whole params (and the activations),
never the whole model:

    peak params per device ~ |params| / fsdp + max(|layer l|, |embedding|, |LM head|)

Each gather waits for its layer's input through an optimisation barrier (`gather_params`'s
`after`); without one the compiler is free to start every gather at the top of the program.
The gradient of a gather is a reduce-scatter, so under `jax.grad` each layer's gradient comes
back to shards as its backward pass ends. With remat (`Transformer.remat`) the backward pass
gathers each layer again; without it, autodiff keeps every gathered layer for the backward
pass. The price is communication: every forward pass (every batch, every group of sequences)
gathers the whole model again, one layer at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec
FSDP = "fsdp"
TRAIN_DATA_AXES = ("data", FSDP)


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


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """PartitionSpec splitting the largest axis of `shape` divisible by `fsdp_size` over "fsdp"
    (ties: the first); P() when fsdp_size is 1 or no axis divides."""
    if fsdp_size <= 1:
        return P()
    fits = [i for i, n in enumerate(shape) if n % fsdp_size == 0 and n >= fsdp_size]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: (shape[i], -i))
    return P(*([None] * axis), FSDP)


def param_spec(mesh: Mesh):
    """leaf -> `fsdp_spec` of its shape on `mesh` (a `train.loop.Task.param_spec`)."""
    size = axis_size(mesh, FSDP)
    return lambda leaf: fsdp_spec(np.shape(leaf), size)


def param_specs(tree, mesh: Mesh):
    """Tree of the `param_spec` PartitionSpecs of every leaf of `tree`."""
    spec = param_spec(mesh)
    return jax.tree.map(spec, tree)


def place_params(tree, mesh: Mesh):
    """Every leaf of `tree` on `mesh` by `param_spec` (replicated when the mesh has no fsdp
    axis of size > 1); a host array only sends each device its own shard."""
    spec = param_spec(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)


def gather_params(tree, specs, *, after=None):
    """Inside `shard_map` with in_specs `specs` for `tree`: every leaf whole again (an
    all-gather over each mesh axis its spec names, tiled along that array axis).

    after: arrays the gathers must wait for, e.g. the input of the layer these params serve.
    An optimisation barrier joins them to the shards. XLA's GPU compiler removes barriers only
    after scheduling, so the gathers cannot be scheduled above it, at the top of the program,
    where every layer's whole params would be alive at once. (Its CPU compiler removes them
    before scheduling and starts every gather first.)"""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if after is not None and any(any(s) for s in jax.tree.leaves(specs, is_leaf=is_spec)):
        _, tree = jax.lax.optimization_barrier((after, tree))

    def gather(x, spec):
        for dim, names in enumerate(spec):
            if names:  # one gather over all of a dimension's axes keeps their major-minor order
                x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
        return x

    return jax.tree.map(gather, tree, specs, is_leaf=is_spec)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How a param tree (nested dicts) comes into each device's program under `shard_map`:
    the in_spec of every leaf, by its path of keys. Hashable, so a module holds it as a static
    field and gathers its params one submodule at a time (`gather`)."""

    specs: tuple[tuple[tuple[str, ...], PartitionSpec], ...]

    @classmethod
    def of(cls, specs_tree) -> ParamLayout:
        """The layout of a tree of PartitionSpecs (e.g. `param_specs(params, mesh)`)."""
        flat, _ = jax.tree_util.tree_flatten_with_path(
            specs_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        return cls(tuple((_path_keys(path), spec) for path, spec in flat))

    def gather(self, prefix: Sequence[str], tree, *, after=None):
        """`gather_params(tree, ..., after=after)` of `tree`, the params at path `prefix`
        (a device's shards of them)."""
        by_path = dict(self.specs)
        prefix = tuple(prefix)
        specs = jax.tree_util.tree_map_with_path(
            lambda path, _: by_path[prefix + _path_keys(path)], tree
        )
        return gather_params(tree, specs, after=after)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path)


def train_batch_spec(mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of a training batch: the leading axis over the mesh's "data" and "fsdp"
    axes ("layers", if any, replicates)."""
    return P(tuple(a for a in TRAIN_DATA_AXES if a in mesh.axis_names))


def train_batch_devices(mesh: Mesh) -> int:
    """How many ways `train_batch_spec` splits a batch."""
    return math.prod(axis_size(mesh, a) for a in TRAIN_DATA_AXES)
