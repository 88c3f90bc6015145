"""utils/checkpoint.py: restore gives back what was saved, and a checkpoint of another state is
a one-line user error (no traceback at the command line), not an orbax stack."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from taylorcal_jax.errors import UserError
from taylorcal_jax.utils.checkpoint import CheckpointMismatch, TrainCheckpointer, has_checkpoint


def test_restore_round_trip_and_mismatch_is_a_user_error(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3, jnp.int32)}
    with TrainCheckpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.restore_or(tree) is tree  # nothing saved yet
        assert ckpt.save(3, tree)
    with TrainCheckpointer(str(tmp_path / "ckpt")) as ckpt:
        back = ckpt.restore_or(jax_zeros_like(tree))
        np.testing.assert_array_equal(back["w"], tree["w"])
        other = {"w": jnp.zeros((4, 3)), "step": jnp.asarray(0, jnp.int32)}  # another shape
        with pytest.raises(CheckpointMismatch) as err:
            ckpt.restore_or(other)
    assert isinstance(err.value, UserError)
    assert "\n" not in err.value.message and str(tmp_path / "ckpt") in err.value.message
    assert "--rerun" in err.value.hint


def jax_zeros_like(tree):
    return {k: jnp.zeros_like(v) for k, v in tree.items()}


def test_has_checkpoint_only_once_a_step_is_finished(tmp_path):
    """What the plan reads to decide whether an interrupted stage resumes (run/plan.py)."""
    path = str(tmp_path / "ckpt")
    assert not has_checkpoint(path)  # no directory
    tree = {"w": jnp.arange(3.0)}
    with TrainCheckpointer(path) as ckpt:
        assert os.path.isdir(path) and not has_checkpoint(path)  # created, nothing saved
        ckpt.save(5, tree)
    assert has_checkpoint(path)
    # A save killed before it finished: the step under orbax's temporary name only.
    os.rename(os.path.join(path, "5"), os.path.join(path, "5.orbax-checkpoint-tmp"))
    assert not has_checkpoint(path)
    with TrainCheckpointer(path) as ckpt:
        assert ckpt.restore_or(tree) is tree  # the loop starts afresh as well
