"""Training converted layers side by side, teacher-forced: stacking, padding and placement.

Letters: L stacked layers, N sequences, T time, D hidden.

Phase-2 alignment (calibrate/align.py) and distillation stage 1 (train/distill_layers.py)
both fit every converted layer's student mixer to its teacher attention layer on the
teacher's own inputs, so the layers never interact: with the mixer params of the L layers
stacked on a leading axis (calibrate/stacking.py) and a per-layer objective

    layer_loss(mixer params, x_ntd, y_ntd, valid_nt) -> scalar

(x the teacher's mixer input, y its attention output), `stacked_losses` gives the L losses
at once by `vmap` over the layer axis. Placement over a mesh: layers on mesh axis "layers",
sequences on "data" (either may have size 1; `activation_spec` is the PartitionSpec of an
[L, N, T, D] activation). With a data axis of size 1 the per-layer losses run under
`shard_map` (each device its own layers, no collectives inside; this keeps custom kernels
such as Pallas out of the SPMD partitioner); otherwise the SPMD partitioner splits both.
`pad_layers` repeats the last layer so that L divides over the "layers" axis; callers drop
(or give zero weight to) the padding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P


def uses_shard_map(mesh) -> bool:
    """Whether `stacked_losses` runs under shard_map on `mesh` (more than one device, no data
    split)."""
    return mesh.size > 1 and sharding.axis_size(mesh, "data") == 1


def activation_spec(mesh) -> P:
    """PartitionSpec of a stacked activation [L, N, T, D] as `stacked_losses` takes it."""
    return P("layers") if uses_shard_map(mesh) else P("layers", "data")


def stacked_losses(layer_loss: Callable, mesh) -> Callable:
    """(stacked params, x_lntd, y_lntd, valid_nt) -> the per-layer losses [L]."""
    fn = jax.vmap(layer_loss, in_axes=(0, 0, 0, None))
    if uses_shard_map(mesh):
        # Layers are independent: each device fits its own slice, no collectives. shard_map
        # keeps custom kernels (Pallas) out of the SPMD partitioner.
        fn = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P("layers"), P("layers"), P("layers"), P()),
            out_specs=P("layers"),
            check_vma=False,
        )
    return fn


def layer_padding(num_layers: int, mesh) -> int:
    """How many copies of the last layer make `num_layers` a multiple of the "layers" axis."""
    return -num_layers % sharding.axis_size(mesh, "layers")


def layer_weights(num_layers: int, pad: int):
    """[L + pad] float32: 1 for the real layers, 0 for the copies `pad_layers` appends (what
    they add to a loss summed over layers)."""
    return jnp.asarray([1.0] * num_layers + [0.0] * pad, jnp.float32)


def pad_layers(tree, pad: int):
    """Every leaf [L, ...] -> [L + pad, ...], the last slice repeated `pad` times."""
    if pad == 0:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), tree)
