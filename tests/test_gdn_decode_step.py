"""ops/gdn/decode_step.py (one read and one write of the state per token) against the
definition, reference.gated_delta_rule_step.

Tolerances (relative, max-abs error over max-abs of the expected value):
  fp64 decode step vs fp64 definition, over 12 chained steps     1e-12
  fp32 decode step vs fp64 definition, over 12 chained steps     1e-5
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import random_inputs, rel_err

from taylorcal_jax.ops.gdn.decode_step import decode_step_xla
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_step

NAMES = ("q", "k", "v", "g", "beta")


def _chain(step, inputs, dtype, **kwargs):
    """Outputs [B, T, H, V] and final state of `step` applied token by token."""
    state = jnp.asarray(inputs["initial_state"], dtype)
    outs = []
    for t in range(inputs["q"].shape[1]):
        o, state = step(*(jnp.asarray(inputs[n][:, t], dtype) for n in NAMES), state, **kwargs)
        outs.append(o)
    return jnp.stack(outs, axis=1), state


@pytest.mark.parametrize(
    "kwargs", [{}, {"scale": 0.7}, {"use_qk_l2norm": False}], ids=["default", "scale", "no_l2"]
)
def test_decode_step_equals_the_definition(kwargs):
    inputs = random_inputs(7, t=12, dtype=np.float64)
    if not kwargs.get("use_qk_l2norm", True):  # keep the un-normalised recurrence stable
        inputs["k"] = inputs["k"] / np.linalg.norm(inputs["k"], axis=-1, keepdims=True)
    with jax.enable_x64(True):
        o_ref, s_ref = _chain(gated_delta_rule_step, inputs, jnp.float64, **kwargs)
        o64, s64 = _chain(decode_step_xla, inputs, jnp.float64, **kwargs)
        assert o64.dtype == jnp.float64 and s64.dtype == jnp.float64
        assert rel_err(o64, o_ref) < 1e-12 and rel_err(s64, s_ref) < 1e-12
        o_ref, s_ref = np.asarray(o_ref), np.asarray(s_ref)
    o32, s32 = _chain(
        jax.jit(decode_step_xla, static_argnames=("scale", "use_qk_l2norm")),
        inputs,
        jnp.float32,
        **kwargs,
    )
    assert rel_err(o32, o_ref) < 1e-5 and rel_err(s32, s_ref) < 1e-5


def test_decode_step_keeps_v_dtype_and_float32_state():
    inputs = random_inputs(8, t=1)
    args = [jnp.asarray(inputs[n][:, 0], jnp.bfloat16) for n in NAMES]
    o, state = decode_step_xla(*args, jnp.asarray(inputs["initial_state"]))
    want_o, want_state = gated_delta_rule_step(*args, jnp.asarray(inputs["initial_state"]))
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert o.shape == want_o.shape and state.shape == want_state.shape
    assert rel_err(state, want_state) < 1e-5


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("g", (2, 3, 1), r"g must have rank 2 \(\[B, H\] for one decoding step\)"),
        # [B, 1] would broadcast over heads
        ("g", (2, 1), r"g must have shape \[B, H\] = \(2, 3\) \(H from q\)"),
        ("beta", (3, 2), r"beta must have shape \[B, H\] = \(2, 3\) \(B, H from q\)"),
        ("v", (2, 1, 3, 5), r"v must have rank 3 \(\[B, H, V\] for one decoding step\)"),
        (
            "state",
            (2, 3, 5, 5),
            r"state must have shape \[B, H, K, V\] = \(2, 3, 4, 5\) \(K from q\)",
        ),
    ],
)
def test_decode_entry_refuses_mis_shaped_operands(name, shape, message):
    """The entry checks the layout first: a g of [B, H, 1] or operands in the sequence layout
    [B, 1, H, .] would otherwise broadcast into outputs of the wrong shape without an error."""
    from taylorcal_jax.ops.gdn.decode_api import gated_delta_rule_decode_step

    b, h, k, v = 2, 3, 4, 5
    right = {"q": (b, h, k), "k": (b, h, k), "v": (b, h, v), "g": (b, h), "beta": (b, h)}
    right["state"] = (b, h, k, v)

    def step(shapes):
        args = [-0.1 * jnp.ones(shapes[n], jnp.float32) for n in (*NAMES, "state")]
        return gated_delta_rule_decode_step(*args)

    with pytest.raises(ValueError, match=message):
        step({**right, name: shape})
    o, state = step(right)
    assert o.shape == (b, h, v) and state.shape == (b, h, k, v)
