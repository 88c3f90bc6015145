"""Orbax checkpoints of training state (params, optimiser state, step) for resumable loops.

`TrainCheckpointer(dir, save_every=k)` wraps an orbax `CheckpointManager`:
`restore_or(state)` returns the latest saved state (same pytree structure as `state`)
or `state` itself when nothing was saved; `maybe_save(step, state)` saves every k steps
(`force=True` saves now). Saves are synchronous-on-exit: `close()` waits for them.
Model weights for sharing are written separately in HF format (models/hf_io.py).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 2):
        if save_every <= 0:
            raise ValueError(f"checkpoint interval must be positive, got {save_every}")
        self.save_every = int(save_every)
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_or(self, state):
        step = self._manager.latest_step()
        if step is None:
            return state
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
        if not force and step % self.save_every:
            return False
        if self._manager.latest_step() == step:
            return False
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        return True

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
