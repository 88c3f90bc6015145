"""The chunk-parallel gated delta rule (chunked.py) and the dispatcher (api.py), tested against the
per-token reference and the NumPy fp64 loop (the next links of the chain of references).

Tolerances (relative: max-abs error over max-abs of the expected value):
  fp32 chunked vs fp64 NumPy loop (values, states)          1e-5
  fp64 chunked vs fp64 reference (values, gradients)        1e-9
  fp32 chunked vs fp32 reference under extreme gates (grads) 1e-3
  bf16 inputs (fp32 arithmetic, bf16 output) vs fp32 reference on the same inputs  1e-2
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import numpy_gated_delta_rule, random_inputs, rel_err
from jax.test_util import check_grads

from taylorcal_jax.ops import dispatch
from taylorcal_jax.ops.gdn import api
from taylorcal_jax.ops.gdn.chunked import gated_delta_rule_chunked, unit_lower_inverse
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

FP32_TOL = 1e-5
FP64_TOL = 1e-9
NAMES = ("q", "k", "v", "g", "beta")


@pytest.fixture
def x64():
    """Enables float64 for one test only (jax.enable_x64 restores the setting on exit)."""
    with jax.enable_x64(True):
        yield


def _args(inputs, dtype=jnp.float32):
    return [jnp.asarray(inputs[n], dtype) for n in NAMES]


def _state(inputs, dtype=jnp.float32):
    s = inputs.get("initial_state")
    return None if s is None else jnp.asarray(s, dtype)


def _chunked(inputs, chunk_size, dtype=jnp.float32):
    return gated_delta_rule_chunked(
        *_args(inputs, dtype),
        initial_state_bhkv=_state(inputs, dtype),
        output_final_state=True,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 16, 64])
def test_chunked_matches_numpy_loop_for_any_chunk_size(chunk_size):
    # T = 37 is not a multiple of any chunk size > 1, and shorter than 64.
    inputs = random_inputs(10, t=37)
    o, state = _chunked(inputs, chunk_size)
    assert o.dtype == jnp.float32 and state.dtype == jnp.float32
    o_np, state_np = numpy_gated_delta_rule(**inputs)
    assert rel_err(o, o_np) < FP32_TOL
    assert rel_err(state, state_np) < FP32_TOL


def test_chunked_matches_reference_fp64_and_single_token(x64):
    inputs = random_inputs(11, t=23, dtype=np.float64)
    o_ref, s_ref = gated_delta_rule_reference(
        *_args(inputs, jnp.float64), initial_state_bhkv=_state(inputs, jnp.float64),
        output_final_state=True,
    )  # fmt: skip
    o, s = _chunked(inputs, 5, jnp.float64)
    assert o.dtype == jnp.float64
    assert rel_err(o, o_ref) < FP64_TOL and rel_err(s, s_ref) < FP64_TOL
    one = {n: x[:, :1] if n != "initial_state" else x for n, x in inputs.items()}
    o1, s1 = _chunked(one, 5, jnp.float64)
    o1_np, s1_np = numpy_gated_delta_rule(**one)
    assert rel_err(o1, o1_np) < FP64_TOL and rel_err(s1, s1_np) < FP64_TOL


@pytest.mark.parametrize("c", [1, 5, 16, 64])
def test_unit_lower_inverse_matches_numpy_fp64(x64, c):
    # Sizes that are and are not powers of two (padded internally); derivative dT = -T dA T.
    rng = np.random.default_rng(c)
    a = np.tril(rng.standard_normal((2, 3, c, c)), -1) * 0.3
    t = unit_lower_inverse(jnp.asarray(a))
    assert rel_err(t, np.linalg.inv(np.eye(c) + a)) < FP64_TOL
    da = np.tril(rng.standard_normal(a.shape), -1)
    _, dt = jax.jvp(unit_lower_inverse, (jnp.asarray(a),), (jnp.asarray(da),))
    eps = 1e-6
    fd = (np.linalg.inv(np.eye(c) + a + eps * da) - np.linalg.inv(np.eye(c) + a - eps * da)) / (
        2 * eps
    )
    assert rel_err(dt, fd) < 1e-7


def test_chunked_without_initial_or_final_state():
    inputs = random_inputs(12, t=10, with_state=False)
    o, state = gated_delta_rule_chunked(*_args(inputs), chunk_size=4)
    assert state is None
    assert rel_err(o, numpy_gated_delta_rule(**inputs)[0]) < FP32_TOL


def test_chunked_two_halves_with_state_passed_on_equal_one_run():
    inputs = random_inputs(13, t=37)
    o_full, s_full = _chunked(inputs, 8)
    first = {n: x[:, :13] for n, x in inputs.items() if n != "initial_state"}
    second = {n: x[:, 13:] for n, x in inputs.items() if n != "initial_state"}
    o1, s1 = _chunked({**first, "initial_state": inputs["initial_state"]}, 8)
    o2, s2 = _chunked({**second, "initial_state": s1}, 8)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_full) < FP32_TOL
    assert rel_err(s2, s_full) < FP32_TOL


def test_chunked_beta_zero_only_decays_and_reads_the_initial_state():
    inputs = random_inputs(14, t=21)
    inputs["beta"] = np.zeros_like(inputs["beta"])
    o, state = _chunked(inputs, 8)
    kdim = inputs["q"].shape[-1]
    cum_g = np.cumsum(inputs["g"].astype(np.float64), axis=1)
    q = inputs["q"] / np.sqrt(np.sum(inputs["q"] ** 2, axis=-1, keepdims=True) + 1e-6)
    s0 = inputs["initial_state"].astype(np.float64)
    expected_o = kdim**-0.5 * np.exp(cum_g)[..., None] * np.einsum("bthk,bhkv->bthv", q, s0)
    assert rel_err(o, expected_o) < FP32_TOL
    assert rel_err(state, np.exp(cum_g[:, -1])[..., None, None] * s0) < FP32_TOL


def _loss_fn(impl, chunk_size, cot_o, cot_s):
    """Scalar <o, cot_o> + <S_T, cot_s>, so one gradient covers both outputs."""

    def loss(q, k, v, g, beta, s0):
        kwargs = dict(initial_state_bhkv=s0, output_final_state=True)
        if impl == "chunked":
            o, s = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
        else:
            o, s = gated_delta_rule_reference(q, k, v, g, beta, **kwargs)
        return jnp.sum(o * cot_o) + jnp.sum(s * cot_s)

    return loss


def _outputs_and_grads(impl, chunk_size, args, cot_o, cot_s):
    """((o, final state), gradients w.r.t. q, k, v, g, beta, initial state) from one jax.vjp."""

    def f(q, k, v, g, beta, s0):
        kwargs = dict(initial_state_bhkv=s0, output_final_state=True)
        if impl == "chunked":
            return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
        return gated_delta_rule_reference(q, k, v, g, beta, **kwargs)

    out, vjp = jax.vjp(f, *args)
    return out, vjp((cot_o, cot_s))


def test_extreme_gates_give_finite_values_and_gradients():
    # Strong decay (g down to -20: G reaches -800 in a chunk of 40, exp underflows to 0),
    # beta exactly 0 and 1 mixed with intermediate values.
    inputs = random_inputs(15, t=40, g_min=-20.0, g_max=0.0)
    rng = np.random.default_rng(0)
    inputs["g"][:, ::3] = -20.0
    inputs["g"][:, 1::7] = 0.0
    inputs["beta"] = rng.choice(np.array([0.0, 1.0, 0.5], np.float32), inputs["beta"].shape)
    o_np, s_np = numpy_gated_delta_rule(**inputs)
    cot_o = jnp.asarray(rng.standard_normal(inputs["v"].shape), jnp.float32)
    cot_s = jnp.asarray(rng.standard_normal(inputs["initial_state"].shape), jnp.float32)
    args = (*_args(inputs), _state(inputs))
    _, grads_ref = _outputs_and_grads("reference", 0, args, cot_o, cot_s)
    for chunk_size in (16, 64):
        (o, s), grads = _outputs_and_grads("chunked", chunk_size, args, cot_o, cot_s)
        assert np.isfinite(o).all() and np.isfinite(s).all()
        assert rel_err(o, o_np) < FP32_TOL and rel_err(s, s_np) < FP32_TOL
        for name, gr, gr_ref in zip((*NAMES, "initial_state"), grads, grads_ref, strict=True):
            assert np.isfinite(gr).all(), name
            assert rel_err(gr, gr_ref) < 1e-3, name


def test_chunked_gradients_match_reference_vjp_fp64(x64):
    inputs = random_inputs(16, b=1, t=11, h=2, k=4, v=3, dtype=np.float64)
    args = (*_args(inputs, jnp.float64), _state(inputs, jnp.float64))
    rng = np.random.default_rng(1)
    cot_o = jnp.asarray(rng.standard_normal(inputs["v"].shape))
    cot_s = jnp.asarray(rng.standard_normal(inputs["initial_state"].shape))
    (o, s), grads = _outputs_and_grads("chunked", 4, args, cot_o, cot_s)
    (o_ref, s_ref), grads_ref = _outputs_and_grads("reference", 0, args, cot_o, cot_s)
    assert rel_err(o, o_ref) < FP64_TOL and rel_err(s, s_ref) < FP64_TOL
    for name, gr, gr_ref in zip((*NAMES, "initial_state"), grads, grads_ref, strict=True):
        assert gr.dtype == jnp.float64, name
        assert rel_err(gr, gr_ref) < FP64_TOL, name


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_check_grads_tiny_fp64(x64, impl):
    # Numerical vs automatic derivatives (forward and reverse mode), all six inputs.
    inputs = random_inputs(17, b=1, t=5, h=1, k=3, v=2, dtype=np.float64)
    args = (*_args(inputs, jnp.float64), _state(inputs, jnp.float64))
    rng = np.random.default_rng(2)
    cot_o = jnp.asarray(rng.standard_normal(inputs["v"].shape))
    cot_s = jnp.asarray(rng.standard_normal(inputs["initial_state"].shape))
    check_grads(jax.jit(_loss_fn(impl, 2, cot_o, cot_s)), args, order=1, modes=("fwd", "rev"))


def test_backward_keeps_one_state_per_chunk_not_chunk_internals():
    # What reverse mode stores (the leaves of the vjp closure) is bounded by the inputs plus one
    # [B,H,K,V] state per chunk, per-token vectors (v' and u [V], w, q exp(G) and k exp(G_C - G)
    # [K]), two C x C matrices per chunk (T = (I + A)^-1, Gamma * q k^T) and exp(G_C): Gamma, A
    # and the rest are recomputed (jax.checkpoint), and no state per token is kept.
    b, t, h, kdim, vdim, c = 1, 64, 1, 16, 16, 8
    inputs = random_inputs(18, b=b, t=t, h=h, k=kdim, v=vdim)
    args = (*_args(inputs), _state(inputs))

    def f(*a):
        return gated_delta_rule_chunked(
            *a[:5], initial_state_bhkv=a[5], output_final_state=True, chunk_size=c
        )

    _, vjp = jax.vjp(f, *args)
    stored = sum(x.size for x in jax.tree_util.tree_leaves(vjp))
    input_elems = sum(x.size for x in args)
    n_chunks = t // c
    per_chunk = kdim * vdim + 2 * c * c + 1
    per_token = 2 * vdim + 3 * kdim
    saved = n_chunks * b * h * per_chunk + b * t * h * per_token
    assert stored <= input_elems + saved + 16, stored
    assert n_chunks * per_chunk + t * per_token < t * kdim * vdim  # the bound is below per-token


def test_bf16_residuals_stay_bf16_and_jvp_works():
    # bf16 inputs: the saved inputs and the per-token k, q, w, v' stay 16-bit; the states, T, u
    # and exp(G_C) are float32.
    b, t, h, kdim, vdim, c = 1, 32, 1, 8, 4, 8
    inputs = random_inputs(24, b=b, t=t, h=h, k=kdim, v=vdim)
    args = _args(inputs, jnp.bfloat16)

    def f(*a):
        return gated_delta_rule_chunked(*a, output_final_state=True, chunk_size=c)

    _, vjp = jax.vjp(f, *args)
    fp32_elems = sum(x.size for x in jax.tree_util.tree_leaves(vjp) if x.dtype == jnp.float32)
    bound = (t // c) * b * h * (kdim * vdim + c * c + 1) + b * t * h * vdim
    assert fp32_elems <= bound + 16, fp32_elems  # + scalars
    # Forward mode (jvp) agrees with reverse mode: <J t, c> == <t, J^T c> for random t, c.
    rng = np.random.default_rng(3)
    args32 = _args(inputs)
    tangents = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in args32]
    cot = jnp.asarray(rng.standard_normal(inputs["v"].shape), jnp.float32)

    def o_only(*a):
        return gated_delta_rule_chunked(*a, chunk_size=c)[0]

    _, jt = jax.jvp(o_only, args32, tangents)
    _, vjp32 = jax.vjp(o_only, *args32)
    lhs = float(jnp.sum(jt * cot))
    rhs = float(sum(jnp.sum(a * b_) for a, b_ in zip(tangents, vjp32(cot), strict=True)))
    assert abs(lhs - rhs) <= 1e-4 * max(abs(lhs), 1.0), (lhs, rhs)


def test_bf16_inputs_fp32_arithmetic():
    inputs = random_inputs(19, t=33)
    args16 = _args(inputs, jnp.bfloat16)
    o, s = gated_delta_rule_chunked(
        *args16, initial_state_bhkv=_state(inputs), output_final_state=True, chunk_size=16
    )
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # Reference in fp32 on the same (bf16-rounded) inputs: only the arithmetic may differ.
    o_ref, s_ref = gated_delta_rule_reference(
        *(x.astype(jnp.float32) for x in args16),
        initial_state_bhkv=_state(inputs),
        output_final_state=True,
    )
    assert rel_err(o.astype(jnp.float32), o_ref) < 1e-2
    assert rel_err(s, s_ref) < 1e-2


# --- api.gated_delta_rule ---


def test_api_dispatches_to_each_implementation(caplog, monkeypatch):
    inputs = random_inputs(20, t=9)
    kwargs = dict(initial_state_bhkv=_state(inputs), output_final_state=True, chunk_size=4)
    o_ref, s_ref = api.gated_delta_rule(*_args(inputs), impl="reference", **kwargs)
    o_ch, s_ch = api.gated_delta_rule(*_args(inputs), impl="chunked", **kwargs)
    o_np, s_np = numpy_gated_delta_rule(**inputs)
    for o, s in ((o_ref, s_ref), (o_ch, s_ch)):
        assert rel_err(o, o_np) < FP32_TOL and rel_err(s, s_np) < FP32_TOL
    if jax.default_backend() == "cpu":
        monkeypatch.setattr(dispatch, "_logged", set())
        with caplog.at_level(logging.INFO, logger=api.__name__):
            o_auto, _ = api.gated_delta_rule(*_args(inputs), impl="auto", **kwargs)
            api.gated_delta_rule(*_args(inputs), impl="auto", **kwargs)
        assert np.array_equal(o_auto, o_ch)
        logged = [r.getMessage() for r in caplog.records if r.name == api.__name__]
        assert len(logged) == 1 and "'chunked'" in logged[0], logged


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_runs_the_chunked_op_where_the_kernels_refuse_the_residuals_or_an_empty_sequence(
    backend, monkeypatch
):
    """ "auto" chose the kernels without asking whether they take pallas_residuals (the float32
    GPU path keeps "inputs" only, the TPU kernels refuse "t") or T = 0, and the call raised; it
    runs the chunked op there, as for any inputs the kernels refuse."""
    monkeypatch.setattr(api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(dispatch, "_logged", set())
    inputs = random_inputs(23, t=9, k=16, v=16)
    q, k, v = _args(inputs)[:3]
    assert api.resolve_impl("auto", q, k, v, 16) != "chunked"  # the kernels take these
    assert api.resolve_impl("auto", q, k, v, 16, "t") == "chunked"
    assert api.resolve_impl("auto", q[:, :0], k[:, :0], v[:, :0], 16) == "chunked"
    kwargs = dict(initial_state_bhkv=_state(inputs), output_final_state=True, chunk_size=16)
    o, s = api.gated_delta_rule(*_args(inputs), impl="auto", pallas_residuals="t", **kwargs)
    o_ch, s_ch = api.gated_delta_rule(*_args(inputs), impl="chunked", **kwargs)
    assert np.array_equal(o, o_ch) and np.array_equal(s, s_ch)
    empty = [x[:, :0] for x in _args(inputs)]
    o, s = api.gated_delta_rule(*empty, impl="auto", **kwargs)
    assert o.shape[1] == 0 and np.array_equal(s, kwargs["initial_state_bhkv"])


def test_api_pallas_on_cpu_is_a_clear_error_not_a_fallback():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU refusal")
    inputs = random_inputs(21, t=4)
    with pytest.raises(api.ImplementationUnavailableError, match="needs a GPU backend.*'cpu'"):
        api.gated_delta_rule(*_args(inputs), impl="pallas")


def _bad(**changes):
    inputs = random_inputs(22, b=2, t=5, h=3, k=4, v=2)
    args = dict(zip(NAMES, _args(inputs), strict=True))
    kwargs = {"initial_state_bhkv": _state(inputs)}
    for name, value in changes.items():
        keywords = ("initial_state_bhkv", "chunk_size", "impl", "pallas_residuals")
        (kwargs if name in keywords else args)[name] = value
    return [args[n] for n in NAMES], kwargs


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"q": jnp.zeros((2, 5, 3))}, r"q must have rank 4 \(\[B, T, H, K\]\)"),
        ({"v": jnp.zeros((2, 5, 3, 2, 1))}, r"v must have rank 4"),
        ({"g": jnp.zeros((2, 5, 3, 1))}, r"g must have rank 3"),
        (
            {"k": jnp.zeros((1, 5, 3, 4))},
            r"k must have shape \[B, T, H, K\] = \(2, 5, 3, 4\) \(B from q\)",
        ),
        (
            {"k": jnp.zeros((2, 5, 3, 8))},
            r"k must have shape \[B, T, H, K\] = \(2, 5, 3, 4\) \(K from q\), got \(2, 5, 3, 8\)",
        ),
        (
            {"v": jnp.zeros((2, 6, 3, 2))},
            r"v must have shape \[B, T, H, V\] = \(2, 5, 3, 2\) \(T from q\)",
        ),
        ({"g": jnp.zeros((2, 5, 2))}, r"g must have shape \[B, T, H\] = \(2, 5, 3\) \(H from q\)"),
        ({"beta": jnp.zeros((2, 4, 3))}, r"beta must have shape \[B, T, H\]"),
        ({"q": jnp.zeros((2, 5, 3, 4), jnp.int32)}, r"q must be a floating-point array"),
        (
            {"initial_state_bhkv": jnp.zeros((2, 3, 2, 4))},
            r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 2\) \(K from q; V from v\)",
        ),
        ({"chunk_size": 0}, r"chunk_size must be an int >= 1, got 0"),
        ({"chunk_size": 2.0}, r"chunk_size must be an int >= 1"),
        ({"impl": "triton"}, r"unknown impl 'triton'; valid choices are reference, chunked, "),
        ({"pallas_residuals": "all"}, r"unknown pallas_residuals 'all'; valid: auto, inputs"),
    ],
    ids=lambda x: None if isinstance(x, str) else str(sorted(x))[:30],
)
def test_api_rejects_bad_inputs_with_clear_messages(changes, message):
    args, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=message):
        api.gated_delta_rule(*args, **kwargs)


@pytest.mark.parametrize("entry", ["chunked", "pallas_gpu", "pallas_tpu"])
def test_each_entry_point_called_directly_checks_its_operands(entry):
    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas
    from taylorcal_jax.ops.gdn.pallas_tpu.op import gated_delta_rule_pallas_tpu

    fn = {
        "chunked": gated_delta_rule_chunked,
        "pallas_gpu": gated_delta_rule_pallas,
        "pallas_tpu": gated_delta_rule_pallas_tpu,
    }[entry]
    for changes, message in [
        (
            {"k": jnp.zeros((2, 5, 3, 8))},
            r"k must have shape \[B, T, H, K\] = \(2, 5, 3, 4\) \(K from q\), got \(2, 5, 3, 8\)",
        ),
        (
            {"initial_state_bhkv": jnp.zeros((2, 3, 2, 4))},
            r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 2\) \(K from q; V from v\)",
        ),
        ({"q": jnp.zeros((2, 5, 3, 4), jnp.int32)}, r"q must be a floating-point array"),
    ]:
        args, kwargs = _bad(**changes)
        with pytest.raises(ValueError, match=message):
            fn(*args, **kwargs)


def test_chunked_sharded_over_batch_and_heads_equals_single_device():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs the 8 fake CPU devices of conftest")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    inputs = random_inputs(23, b=4, t=12, h=2)
    args = (*_args(inputs), _state(inputs))

    def f(q, k, v, g, beta, s0):
        return gated_delta_rule_chunked(
            q, k, v, g, beta, initial_state_bhkv=s0, output_final_state=True, chunk_size=8
        )

    mesh = Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "heads"))
    specs = (P("data", None, "heads"),) * 5 + (P("data", "heads"),)
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs, strict=True)]
    o_sh, s_sh = jax.jit(f)(*sharded)
    o, s = jax.jit(f)(*args)
    assert not o_sh.sharding.is_fully_replicated  # stays distributed, no gather to one device
    assert rel_err(o_sh, o) < 1e-6 and rel_err(s_sh, s) < 1e-6
