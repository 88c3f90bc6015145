"""The TPU Pallas gated delta rule (ops/gdn/pallas_tpu/): the TPU interpreter on the CPU.

Shapes and input regimes of the GPU kernel's tests (test_gdn_pallas.py), run with
pl.pallas_call(interpret=pltpu.InterpretParams()), which keeps the VMEM scratch across the
sequential chunk axis as a TPU does.

Tolerances (relative: max-abs error over max-abs of the expected value, gdn_testing.rel_err):
  fp32 forward vs the fp64 NumPy loop (values, states)                          2e-5
  fp32 gradients vs jax.vjp of the fp32 per-token reference (HIGHEST)           1e-4
  extreme gates (g down to -20, beta near 0 and 1), fp32                        1e-4
  bf16 gradients vs the fp32 reference on the same inputs (||.||_2 ratio)       2e-2
  the in-kernel [C, C] inverse vs an fp64 inverse                               1e-5
Shapes stay tiny (K in {16, 32}, V <= 256, T <= 200) to keep the interpreter fast.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import exported_gradient_module, numpy_gated_delta_rule, random_inputs, rel_err

from taylorcal_jax.ops.gdn import api
from taylorcal_jax.ops.gdn.pallas_tpu.common import unit_lower_inverse
from taylorcal_jax.ops.gdn.pallas_tpu.config import TPUConfig, resolve_residuals
from taylorcal_jax.ops.gdn.pallas_tpu.op import gated_delta_rule_pallas_tpu, unsupported_reason
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

NAMES = ("q", "k", "v", "g", "beta")


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _args(inputs, dtype=jnp.float32):
    return [jnp.asarray(inputs[n], jnp.float32 if n == "g" else dtype) for n in NAMES]


def _tpu(inputs, *, chunk_size=64, config=None, state=True, **kw):
    s0 = inputs.get("initial_state") if state else None
    return gated_delta_rule_pallas_tpu(
        *_args(inputs),
        initial_state_bhkv=None if s0 is None else jnp.asarray(s0),
        output_final_state=True,
        chunk_size=chunk_size,
        interpret=True,
        config=config,
        **kw,
    )


@pytest.mark.parametrize(
    "t, k, v, chunk_size",
    [
        (200, 32, 32, 64),  # T padded, 4 chunks
        (37, 16, 32, 16),
        (50, 32, 16, 32),
        (130, 16, 16, 128),  # C = 128 (MXU-sized chunks), inverse blocks of 8
        (20, 16, 256, 16),  # two value blocks of 128
    ],
)
def test_forward_matches_numpy_loop(t, k, v, chunk_size):
    inputs = random_inputs(1, b=2, t=t, h=2, k=k, v=v)
    o, state = _tpu(inputs, chunk_size=chunk_size)
    o_np, state_np = numpy_gated_delta_rule(**inputs)
    assert o.shape == o_np.shape and o.dtype == jnp.float32 and state.dtype == jnp.float32
    assert rel_err(o, o_np) < 2e-5
    assert rel_err(state, state_np) < 2e-5


@pytest.mark.parametrize("residuals", ["states", "inputs"])
def test_forward_and_gradients_under_differentiation_match(residuals):
    """The forward run under differentiation against the fp64 loop, and the gradients of every
    input against jax.vjp of the fp32 reference; "inputs" reruns the forward kernel in the
    backward, "states" reads h and v' kept by the forward."""
    inputs = random_inputs(2, b=1, t=45, h=2, k=16, v=32)
    args = _args(inputs) + [jnp.asarray(inputs["initial_state"])]
    rng = np.random.default_rng(3)
    ct = (
        jnp.asarray(rng.standard_normal((1, 45, 2, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32),
    )

    def run(fn, **kw):
        out, vjp = jax.vjp(
            lambda *a: fn(*a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw), *args
        )
        return out, vjp(ct)

    (o, s), grads = run(
        gated_delta_rule_pallas_tpu, chunk_size=16, interpret=True, residuals=residuals
    )
    o_np, s_np = numpy_gated_delta_rule(**inputs)
    assert rel_err(o, o_np) < 2e-5 and rel_err(s, s_np) < 2e-5
    with jax.default_matmul_precision("highest"):
        _, ref = run(gated_delta_rule_reference)
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


def test_gradients_across_value_blocks_and_without_initial_state():
    """Two value blocks (partial gradients summed over them), no initial state: gradients of
    q, k, v, g, beta against the fp32 reference."""
    inputs = random_inputs(21, b=1, t=24, h=1, k=16, v=256, with_state=False)
    args = _args(inputs)
    ct = jnp.asarray(np.random.default_rng(22).standard_normal((1, 24, 1, 256)), jnp.float32)

    def grads(fn, **kw):
        return jax.vjp(lambda *a: fn(*a, **kw)[0], *args)[1](ct)

    got = grads(gated_delta_rule_pallas_tpu, chunk_size=16, interpret=True)
    with jax.default_matmul_precision("highest"):
        ref = grads(gated_delta_rule_reference)
    for name, a, r in zip(NAMES, got, ref, strict=True):
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


def test_bf16_gradients_close_to_fp32_reference():
    inputs = random_inputs(11, b=1, t=40, h=2, k=16, v=16, g_min=-20.0)
    args = _args(inputs, jnp.bfloat16) + [jnp.asarray(inputs["initial_state"])]
    rng = np.random.default_rng(12)
    ct = (
        jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((1, 2, 16, 16)), jnp.float32),
    )

    def run(fn, xs, **kw):
        return jax.vjp(
            lambda *a: fn(*a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw), *xs
        )[1]((ct[0].astype(xs[2].dtype), ct[1]))

    grads = run(gated_delta_rule_pallas_tpu, args, chunk_size=32, interpret=True)
    with jax.default_matmul_precision("highest"):
        ref = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert a.dtype == r.dtype or name != "initial_state", name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _l2_rel(a, r) < 2e-2, (name, _l2_rel(a, r))


def test_forward_without_qk_l2_norm_matches_numpy_loop():
    inputs = random_inputs(6, b=1, t=70, h=2, k=32, v=32, with_state=False)
    o, state = _tpu(inputs, chunk_size=32, state=False, use_qk_l2norm=False)
    o_np, state_np = numpy_gated_delta_rule(**inputs, use_qk_l2norm=False)
    assert rel_err(o, o_np) < 2e-5
    assert rel_err(state, state_np) < 2e-5


def test_extreme_gates_and_betas_stay_finite_and_match():
    inputs = random_inputs(4, b=1, t=64, h=2, k=16, v=16, g_min=-20.0, g_max=-0.0)
    inputs["beta"] = np.where(np.arange(64)[None, :, None] % 2 == 0, 1e-4, 1.0 - 1e-4).astype(
        np.float32
    ) * np.ones_like(inputs["beta"])
    o, state = _tpu(inputs, chunk_size=64)
    o_np, state_np = numpy_gated_delta_rule(**inputs)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(state)).all()
    assert rel_err(o, o_np) < 1e-4
    assert rel_err(state, state_np) < 1e-4


@pytest.mark.parametrize("c", [16, 64, 128])
@pytest.mark.parametrize("g_min", [-0.1, -20.0])
@pytest.mark.parametrize("aligned", [False, True])
def test_unit_lower_inverse_matches_fp64_inverse(c, g_min, aligned):
    """aligned: nearly parallel keys (k k^T close to all ones), where T is mild but powers of A
    are large; the inverse must not form such powers."""
    rng = np.random.default_rng(c)
    k = rng.standard_normal((c, 32))
    if aligned:
        k = k[:1] + 0.05 * k
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    gg = np.cumsum(rng.uniform(g_min, 0.0, c))
    beta = rng.uniform(0.0, 1.0, c)
    low = np.tril(np.ones((c, c), bool), -1)
    a = np.where(low, beta[:, None] * (k @ k.T) * np.exp(np.where(low, gg[:, None] - gg, 0.0)), 0)
    expected = np.linalg.inv(np.eye(c) + a)
    assert rel_err(unit_lower_inverse(jnp.asarray(a, jnp.float32)), expected) < 1e-5


def test_no_final_state_and_the_state_chains_across_calls():
    """Two halves with the state handed on equal one run; without output_final_state the
    state is None."""
    inputs = random_inputs(6, b=1, t=48, h=2, k=16, v=16)
    o, state = _tpu(inputs, chunk_size=16)
    first = {n: x[:, :20] for n, x in inputs.items() if n != "initial_state"}
    first["initial_state"] = inputs["initial_state"]
    o1, s1 = _tpu(first, chunk_size=16)
    second = {n: x[:, 20:] for n, x in inputs.items() if n != "initial_state"}
    second["initial_state"] = np.asarray(s1)
    o2, s2 = _tpu(second, chunk_size=16)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < 2e-5
    assert rel_err(s2, state) < 2e-5
    _, none = gated_delta_rule_pallas_tpu(*_args(first), chunk_size=16, interpret=True)
    assert none is None


def test_rejects_unsupported_shapes_and_options():
    inputs = random_inputs(8, b=1, t=16, h=1, k=16, v=16, with_state=False)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        gated_delta_rule_pallas_tpu(*_args(inputs), chunk_size=48, interpret=True)
    with pytest.raises(ValueError, match="residuals must be"):
        gated_delta_rule_pallas_tpu(*_args(inputs), interpret=True, residuals="t")
    with pytest.raises(ValueError, match="block_v must be a multiple of 128"):
        TPUConfig(block_v=64)
    assert resolve_residuals("auto") == "states" and resolve_residuals("inputs") == "inputs"
    q = jnp.zeros((1, 16, 1, 16), jnp.float32)
    assert unsupported_reason(q, q, q, 64) is None
    assert "multiple of block_v" in unsupported_reason(q, q, jnp.zeros((1, 16, 1, 200)), 64)
    assert "float64" in unsupported_reason(np.zeros((1, 16, 1, 16)), q, q, 64)
    q12 = jnp.zeros((1, 16, 1, 12), jnp.float32)
    assert "multiple of 8" in unsupported_reason(q12, q12, q, 64)


@pytest.mark.parametrize("kdim, vdim", [(12, 128), (24, 128), (8, 64)])
def test_head_dims_the_check_accepts_lower_to_mosaic(kdim, vdim):
    # forward and backward (which keeps the chunk states in blocks of K rows) for a TPU: what
    # unsupported_reason lets through must lower, and "auto" falls back on what it refuses
    operand = jax.ShapeDtypeStruct((1, 64, 2, kdim), jnp.float32)
    value = jax.ShapeDtypeStruct((1, 64, 2, vdim), jnp.float32)
    if unsupported_reason(operand, operand, value, 16) is not None:
        assert kdim % 8
        return
    module = exported_gradient_module(
        gated_delta_rule_pallas_tpu, "tpu", jnp.float32, 64, kdim, vdim, chunk_size=16
    )
    assert "gdn_tpu_reverse" in module


def test_api_pallas_needs_a_gpu_or_tpu_backend_here():
    assert jax.default_backend() == "cpu"
    with pytest.raises(
        api.ImplementationUnavailableError, match="needs a GPU backend and pallas_tpu a TPU backend"
    ):
        api.resolve_impl("pallas")
    assert api.resolve_impl("auto") == "chunked"


# ----------------------------------------------------------------------------- compiled, TPU


@pytest.mark.tpu
def test_tpu_api_picks_the_tpu_kernels_and_matches_reference():
    """On a TPU, impl="auto" and "pallas" resolve to "pallas_tpu"; bf16 forward and gradients
    through api.gated_delta_rule against the fp32 reference (||.||_2 ratio 5e-3 / 1e-2, the GPU
    kernel's levels)."""
    assert api.resolve_impl("auto") == api.resolve_impl("pallas") == "pallas_tpu"
    b, t, h, d = 2, 300, 4, 128
    inputs = random_inputs(11, b=b, t=t, h=h, k=d, v=d, g_min=-0.3)
    args = _args(inputs, jnp.bfloat16)
    ct = jnp.asarray(np.random.default_rng(12).standard_normal((b, t, h, d)), jnp.bfloat16)

    def run(fn, xs, **kw):
        o, vjp = jax.vjp(lambda *a: fn(*a, **kw)[0], *xs)
        return o, vjp(ct.astype(o.dtype))

    o, grads = run(api.gated_delta_rule, args, impl="auto")
    with jax.default_matmul_precision("highest"):
        ro, rgrads = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    assert _l2_rel(o, ro) < 5e-3
    for name, a, r in zip(NAMES, grads, rgrads, strict=True):
        assert _l2_rel(a, r) < 1e-2, (name, _l2_rel(a, r))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("residuals", ["inputs", "states"])
def test_forward_and_backward_lower_to_mosaic_for_a_tpu(dtype, residuals):
    # Export for platform "tpu" on the CPU: Pallas's Mosaic lowering of both kernels runs here
    # (block shapes, layouts and ops that Mosaic rejects fail); compiling for a TPU does not.
    module = exported_gradient_module(
        gated_delta_rule_pallas_tpu, "tpu", dtype, 512, residuals=residuals
    )
    kernels = set(re.findall(r'kernel_name = "([^"]+)"', module))
    assert kernels == {"gdn_tpu_forward", "gdn_tpu_reverse"}


def test_kernel_runs_under_64_bit_mode():
    # the unit-lower inverse's block shift stays int32 where 64-bit mode makes Python ints int64
    d = random_inputs(0, b=1, t=20, h=1, k=16, v=16)
    args = [jnp.asarray(d[n], jnp.float32) for n in ("q", "k", "v", "g", "beta")]
    want, _ = gated_delta_rule_pallas_tpu(*args, chunk_size=16, interpret=True)
    with jax.enable_x64(True):
        got, _ = gated_delta_rule_pallas_tpu(*args, chunk_size=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
