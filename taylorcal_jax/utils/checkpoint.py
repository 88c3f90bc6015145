"""Orbax checkpoints of training state (params, optimiser state, counters) for resumable loops.

`TrainCheckpointer(dir)` wraps an orbax `CheckpointManager`: `restore_or(tree)` returns the
latest saved tree (same pytree structure, shapes, dtypes and shardings as `tree`) or `tree`
itself when nothing was saved; `save(step, tree)` saves it as step `step` (once per step).
The caller (train/loop.py) decides when. `close()` waits for pending writes. Model weights
for sharing are written separately in HF format (models/hf_io.py).

`has_checkpoint(dir)` says, without opening a manager (which creates the directory), whether
`restore_or` would restore something: a finished step. Orbax writes a step under a temporary
name and renames it when complete, so a process killed during its first save leaves a
directory with no finished step, and a run that starts from scratch.

Several processes: every process calls `restore_or`, `save` and `close` with its part of the
same global arrays (the loop runs on all of them); orbax writes each process's shards and, from
process 0 only (its default primary host), the directory and metadata. No file is written
here besides orbax's, so nothing else needs gating; the directory must be storage every
process sees.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from taylorcal_jax.errors import UserError


class CheckpointMismatch(UserError):
    """A checkpoint directory holds another state than the run's (other shapes, leaves or
    mesh padding): one line for the user, no traceback."""


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a finished checkpoint (False when it does not exist)."""
    return bool(ocp.utils.checkpoint_steps(os.path.abspath(directory)))


class TrainCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_or(self, tree):
        step = self._manager.latest_step()
        if step is None:
            return tree
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            first_line = str(e).splitlines()[0]
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not hold this run's state ({first_line})",
                hint="it was saved under another model, options or mesh; remove that "
                "directory (or rerun the stage with --rerun=<stage>) to start afresh",
            ) from e

    def save(self, step: int, tree) -> bool:
        """Saves `tree` as step `step` unless that step is saved already; True if it saved."""
        if self._manager.latest_step() == step:
            return False
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        return True

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
