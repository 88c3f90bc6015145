"""The Pallas gated delta rule (ops/gdn/pallas_gpu/): interpret mode on the CPU, compiled on a GPU.

Both kernel paths (config.F32Config, config.BF16Config) run here in interpret mode with float32
operands, so that each is checked at fp32 accuracy; the bfloat16 path also with bf16 operands.
Configurations with other program-count thresholds make the tiny shapes take each branch of the
bfloat16 path (segmented or not, prefetching or not, fused pass at a halved value block or not).

Tolerances (relative: max-abs error over max-abs of the expected value, gdn_testing.rel_err):
  fp32 interpret vs the fp64 NumPy loop (values, states)                 2e-5
  fp32 interpret gradients vs jax.vjp of the fp32 per-token reference   1e-4
  extreme gates (g down to -20, beta near 0 and 1), fp32 interpret      1e-4
  GPU, fp32 inputs (exact fp32 dots) vs the fp32 reference               1e-4
  GPU, bf16 inputs vs the fp32 reference on the same inputs (FLA's level, as ||.||_2 ratio) 5e-3
  bf16 gradients, interpret mode, vs the fp32 reference (||.||_2 ratio)                    2e-2
  closed-form chunk-local backward kernels vs jax.vjp of the XLA chunk-local map, fp32     1e-5
  T of the bfloat16 path's kernel 1 (plain JAX, HIGHEST) vs an fp64 inverse                1e-5
Shapes stay tiny (K, V in {16, 32}, T <= 200) to keep interpret mode fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import (
    TRITON_CALL,
    exported_gradient_module,
    numpy_gated_delta_rule,
    random_inputs,
    rel_err,
)

from taylorcal_jax.ops.gdn.call_options import call_options
from taylorcal_jax.ops.gdn.pallas_gpu import op as pallas_op
from taylorcal_jax.ops.gdn.pallas_gpu.config import (
    BF16_SMALL_HEADS,
    BF16Config,
    F32Config,
    default_config,
    resolve_residuals,
)
from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas, unsupported_reason
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

NAMES = ("q", "k", "v", "g", "beta")
UNSEGMENTED = BF16Config(segment_programs=0)  # the bfloat16 path as at large B * H


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _args(inputs, dtype=jnp.float32):
    return [jnp.asarray(inputs[n], jnp.float32 if n == "g" else dtype) for n in NAMES]


def _static(cfg, chunk=64, use_l2=True, residuals="inputs"):
    from taylorcal_jax.ops.gdn.call_options import Static

    return Static(
        chunk=chunk, scale=1.0, use_l2=use_l2, interpret=True, cfg=cfg, residuals=residuals
    )


def _pallas(inputs, *, chunk_size=64, config=None, dtype=jnp.float32, state=True):
    s0 = inputs.get("initial_state") if state else None
    return gated_delta_rule_pallas(
        *_args(inputs, dtype),
        initial_state_bhkv=None if s0 is None else jnp.asarray(s0),
        output_final_state=True,
        chunk_size=chunk_size,
        interpret=True,
        config=config,
    )


@pytest.mark.parametrize(
    "t, k, v, chunk_size, config",
    [
        (200, 32, 32, 64, F32Config(block_v=16)),  # two value blocks
        (37, 16, 32, 16, F32Config()),
        (50, 32, 16, 32, F32Config()),
        # bfloat16 path, segmented state pass (split forward): 12 segments, prefetching
        (190, 32, 32, 16, BF16Config(block_v=16)),
        # ... 4 segments, not prefetching
        (190, 32, 32, 16, BF16Config(block_v=16, segment_programs=32, prefetch_programs=0)),
        (70, 16, 16, 64, BF16Config(block_v=16)),  # 2 chunks, 2 segments, C = 64
        # unsegmented: the fused pass, at a value block halved to 16 (fused_programs), or not
        (130, 32, 32, 32, UNSEGMENTED),
        (130, 32, 32, 32, BF16Config(segment_programs=0, fused_programs=0)),
        # K not a multiple of the value block: unsegmented whatever segment_programs says
        (90, 16, 32, 32, BF16Config(block_v=32)),
    ],
)
def test_forward_matches_numpy_loop(t, k, v, chunk_size, config):
    inputs = random_inputs(1, b=2, t=t, h=2, k=k, v=v)
    o, state = _pallas(inputs, chunk_size=chunk_size, config=config)
    o_np, state_np = numpy_gated_delta_rule(**inputs)
    assert o.shape == o_np.shape and o.dtype == jnp.float32 and state.dtype == jnp.float32
    assert rel_err(o, o_np) < 2e-5
    assert rel_err(state, state_np) < 2e-5


@pytest.mark.parametrize(
    "config, residuals",
    [
        (F32Config(block_v=16), "auto"),
        # segmented (2 chunks, 2 segments): kernel 1 writes kd; reverse recurrence segmented too
        (BF16Config(block_v=16), "states"),
        (BF16Config(block_v=16), "t"),  # the backward reruns the state pass
        (BF16Config(block_v=16), "inputs"),  # ... and kernel 1
        # unsegmented: the state pass forms kd from k; "inputs" runs the fused pass forward
        (BF16Config(block_v=16, segment_programs=0), "states"),
        (BF16Config(block_v=16, segment_programs=0), "t"),
        (BF16Config(block_v=16, segment_programs=0), "inputs"),
        # sequential kernels without prefetch, segmented and not
        (BF16Config(block_v=16, prefetch_programs=0), "t"),
        (BF16Config(block_v=16, segment_programs=0, prefetch_programs=0), "t"),
    ],
)
def test_forward_and_gradients_under_differentiation_match(config, residuals):
    """The forward run under differentiation (which keeps `residuals`) against the fp64 loop,
    and the gradients of every input against jax.vjp of the fp32 reference."""
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
        gated_delta_rule_pallas,
        chunk_size=32,
        interpret=True,
        config=config,
        residuals=residuals,
    )
    o_np, s_np = numpy_gated_delta_rule(**inputs)
    assert rel_err(o, o_np) < 2e-5 and rel_err(s, s_np) < 2e-5
    with jax.default_matmul_precision("highest"):
        _, ref = run(gated_delta_rule_reference)
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


@pytest.mark.parametrize(
    "config, residuals",
    [(BF16Config(), "auto"), (UNSEGMENTED, "auto"), (BF16Config(), "inputs")],
    ids=["segmented", "unsegmented", "inputs"],
)
def test_bf16_gradients_close_to_fp32_reference(config, residuals):
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

    grads = run(
        gated_delta_rule_pallas,
        args,
        chunk_size=32,
        interpret=True,
        config=config,
        residuals=residuals,
    )
    with jax.default_matmul_precision("highest"):
        ref = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _l2_rel(a, r) < 2e-2, (name, _l2_rel(a, r))


@pytest.mark.parametrize(
    "config", [F32Config(), BF16Config(), UNSEGMENTED], ids=["f32", "bf16_seg", "bf16_fused"]
)
def test_forward_without_qk_l2_norm_matches_numpy_loop(config):
    inputs = random_inputs(6, b=1, t=70, h=2, k=32, v=32)
    args = _args(inputs)
    o, state = gated_delta_rule_pallas(
        *args, output_final_state=True, chunk_size=32, interpret=True, config=config,
        use_qk_l2norm=False,
    )  # fmt: skip
    o_np, state_np = numpy_gated_delta_rule(**{n: inputs[n] for n in NAMES}, use_qk_l2norm=False)
    assert rel_err(o, o_np) < 2e-5
    assert rel_err(state, state_np) < 2e-5


@pytest.mark.parametrize("use_l2, chunk", [(True, 32), (False, 16)])
def test_closed_form_chunk_local_backward_equals_vjp_of_the_xla_map(use_l2, chunk):
    """chunk_backward.chunk_local_backward_call (the bfloat16 path's closed form, two kernels)
    against jax.vjp of backward._chunk_local_xla (the float32 path's XLA map) on random
    cotangents, with T = (I + A)^-1 from an fp64 inverse (fp32, interpret mode)."""
    from taylorcal_jax.ops.gdn.pallas_gpu.backward import _chunk_local_xla
    from taylorcal_jax.ops.gdn.pallas_gpu.chunk_backward import chunk_local_backward_call

    b, tp, h, kd, vd = 1, 2 * chunk, 2, 16, 32
    nt = tp // chunk
    rng = np.random.default_rng(14)

    def rnd(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = rnd(b, tp, h, kd), rnd(b, tp, h, kd), rnd(b, tp, h, vd)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (b, tp, h)), jnp.float32)
    g = jnp.asarray(rng.uniform(-2.0, 0.0, (b, tp, h)), jnp.float32)
    gcum = jnp.cumsum(g.reshape(b, nt, chunk, h), axis=2).reshape(b, tp, h)
    # T per chunk in fp64 from the definition: A = strict(beta (k^ k^T) Gamma)
    k64 = np.asarray(k, np.float64).reshape(b, nt, chunk, h, kd)
    if use_l2:
        k64 = k64 / np.sqrt(np.sum(k64 * k64, axis=-1, keepdims=True) + 1e-6)
    gg = np.asarray(gcum, np.float64).reshape(b, nt, chunk, h)
    be = np.asarray(beta, np.float64).reshape(b, nt, chunk, h)
    low = np.tril(np.ones((chunk, chunk), bool), -1)
    kk = np.einsum("bnihk,bnjhk->bnhij", k64, k64)
    diff = np.moveaxis(gg, 2, -1)[..., :, None] - np.moveaxis(gg, 2, -1)[..., None, :]
    a = np.where(low, np.moveaxis(be, 2, -1)[..., :, None] * kk * np.exp(np.where(low, diff, 0)), 0)
    tmat = np.linalg.inv(np.eye(chunk) + a)  # [B, NT, H, C, C]
    tmat = jnp.asarray(np.moveaxis(tmat, 3, 2).reshape(b, tp, h, chunk), jnp.float32)
    causal = (jnp.arange(tp) % chunk)[None, :, None, None] >= jnp.arange(chunk)
    dw, dqg, dkd = rnd(b, tp, h, kd), rnd(b, tp, h, kd), rnd(b, tp, h, kd)
    du, daqk, dlgc = rnd(b, tp, h, vd), jnp.where(causal, rnd(b, tp, h, chunk), 0.0), rnd(b, tp, h)
    st = _static(BF16Config(), chunk=chunk, use_l2=use_l2)
    got = chunk_local_backward_call(
        q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, st=st, dt=jnp.float32
    )
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda *x: _chunk_local_xla(*x, st=st, dt=jnp.float32), q, k, v, g, beta)
        want = vjp((dw, du, dqg, dkd, daqk, dlgc))
    for name, x, r in zip(NAMES, got, want, strict=True):
        assert x.shape == r.shape and x.dtype == jnp.float32, name
        assert rel_err(x, r) < 1e-5, (name, rel_err(x, r))


@pytest.mark.parametrize("chunk_size, config", [(32, F32Config()), (64, UNSEGMENTED)])
def test_extreme_gates_and_betas_stay_finite_and_match(chunk_size, config):
    inputs = random_inputs(4, b=1, t=64, h=2, k=16, v=16, g_min=-20.0, g_max=-0.0)
    inputs["beta"] = np.where(np.arange(64)[None, :, None] % 2 == 0, 1e-4, 1.0 - 1e-4).astype(
        np.float32
    ) * np.ones_like(inputs["beta"])
    o, state = _pallas(inputs, chunk_size=chunk_size, config=config)
    o_np, state_np = numpy_gated_delta_rule(**inputs)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(state)).all()
    assert rel_err(o, o_np) < 1e-4
    assert rel_err(state, state_np) < 1e-4


@pytest.mark.parametrize("c", [16, 32, 64])
@pytest.mark.parametrize("g_min", [-0.1, -20.0])
@pytest.mark.parametrize("aligned", [False, True])
def test_t_inverse_matches_fp64_inverse(c, g_min, aligned):
    """aligned: nearly parallel keys (k k^T close to all ones), where T is mild but powers of A
    are large; the inverse must not form such powers."""
    from taylorcal_jax.ops.gdn.pallas_gpu.chunk import t_inverse

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
    t = t_inverse(jnp.asarray(a, jnp.float32), jax.lax.Precision.HIGHEST)
    assert rel_err(t, expected) < 1e-5


def test_segments_divide_the_chunks_and_target_one_program_per_sm():
    from taylorcal_jax.ops.gdn.pallas_gpu.segments import num_segments, num_state_segments

    assert num_segments(128, 32, 512) == 4  # 1 x 32768 x 16, BV 64: 32 programs -> 128
    assert num_segments(128, 256, 64) == 1  # 8 x 4096 x 16: already 256 programs
    assert num_segments(128, 16, 12) == 6 and num_segments(128, 32, 13) == 1
    assert num_segments(0, 1, 64) == 1  # 0 = never
    rows = {(8, 4096, 16): 1, (4, 8192, 16): 1, (1, 32768, 16): 4, (16, 2048, 12): 1}
    for (b, t, h), expected in rows.items():  # where the state pass forms kd (unsegmented)
        assert num_state_segments(_static(BF16Config()), b, t, h, 128, 128) == expected
        assert num_state_segments(_static(F32Config()), b, t, h, 128, 128) == 1
    assert num_state_segments(_static(BF16Config()), 1, 32768, 16, 32, 128) == 1  # K % BV


def test_prefetch_only_on_the_bf16_path_where_the_grid_fits_prefetch_programs():
    from taylorcal_jax.ops.gdn.pallas_gpu.common import seq_launch

    def rule(cfg, programs):
        return seq_launch("gdn_states", _static(cfg), programs, jnp.bfloat16)[0]

    assert rule(BF16Config(), 128) and rule(BF16Config(), 32) and not rule(BF16Config(), 129)
    assert not rule(BF16Config(prefetch_programs=0), 1)  # 0 = never
    assert not rule(F32Config(), 1)


def test_fused_block_v_halves_until_enough_programs():
    from taylorcal_jax.ops.gdn.pallas_gpu.output import fused_block_v

    def bv(cfg, b, h, vd=128):
        return fused_block_v(_static(cfg), b, h, vd)

    cfg = BF16Config()
    assert bv(cfg, 8, 16) == 64 and bv(cfg, 4, 16) == 32 and bv(cfg, 16, 12) == 64
    assert bv(cfg, 1, 1) == 16 and bv(cfg, 1, 1, vd=16) == 16
    assert bv(BF16Config(fused_programs=0), 1, 1) == 64  # 0 = block_v as it is


def test_beta_zero_gives_decayed_readout_of_initial_state():
    inputs = random_inputs(5, b=1, t=20, h=2, k=16, v=16, g_min=-0.5)
    inputs["beta"] = np.zeros_like(inputs["beta"])
    o, state = _pallas(inputs, chunk_size=16)
    q = inputs["q"] / np.sqrt(np.sum(inputs["q"] ** 2, -1, keepdims=True) + 1e-6)
    decay = np.exp(np.cumsum(inputs["g"].astype(np.float64), axis=1))  # [B,T,H]
    s0 = inputs["initial_state"].astype(np.float64)
    expected = 16**-0.5 * np.einsum("bthk,bhkv->bthv", q, s0) * decay[..., None]
    assert rel_err(o, expected) < 2e-5
    assert rel_err(state, s0 * decay[:, -1, :, None, None]) < 2e-5


def test_two_halves_with_state_passed_equal_one_run():
    inputs = random_inputs(6, b=1, t=48, h=2, k=16, v=16)
    o, state = _pallas(inputs, chunk_size=16)
    first = {n: x[:, :20] for n, x in inputs.items() if n != "initial_state"}
    first["initial_state"] = inputs["initial_state"]
    o1, s1 = _pallas(first, chunk_size=16)
    second = {n: x[:, 20:] for n, x in inputs.items() if n != "initial_state"}
    second["initial_state"] = np.asarray(s1)
    o2, s2 = _pallas(second, chunk_size=16)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < 2e-5
    assert rel_err(s2, state) < 2e-5


def test_no_initial_state_and_no_final_state():
    inputs = random_inputs(7, b=1, t=16, h=1, k=16, v=16, with_state=False)
    o, state = gated_delta_rule_pallas(*_args(inputs), chunk_size=16, interpret=True)
    assert state is None
    assert rel_err(o, numpy_gated_delta_rule(**inputs)[0]) < 2e-5


@pytest.mark.parametrize(
    "config",
    [
        F32Config(block_v=16),
        BF16Config(block_v=16),  # segmented: the scans start at zeros
        BF16Config(block_v=16, segment_programs=0),
    ],
    ids=["f32", "bf16_seg", "bf16_unseg"],
)
def test_no_initial_state_starts_from_zero(config):
    """Without an initial state the sequential kernels start from zero (no zeros array is made
    or read): outputs, final states and gradients as with explicit zeros."""
    inputs = random_inputs(8, b=1, t=40, h=2, k=16, v=32, with_state=False)
    args = _args(inputs)
    zeros = jnp.zeros((1, 2, 16, 32), jnp.float32)
    rng = np.random.default_rng(9)
    ct = (
        jnp.asarray(rng.standard_normal((1, 40, 2, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32),
    )

    def run(**kw):
        def f(*a):
            return gated_delta_rule_pallas(
                *a, output_final_state=True, chunk_size=16, interpret=True, config=config, **kw
            )

        out, vjp = jax.vjp(f, *args)
        return out, vjp(ct)

    (o, s), grads = run()
    (zo, zs), zgrads = run(initial_state_bhkv=zeros)
    assert rel_err(o, zo) < 1e-6 and rel_err(s, zs) < 1e-6
    for name, a, z in zip(NAMES, grads, zgrads, strict=True):
        assert rel_err(a, z) < 1e-6, name


def test_residuals_resolve_per_path_or_say_why_not():
    assert resolve_residuals(BF16Config(), "auto") == "states"
    assert resolve_residuals(BF16Config(), "t") == "t"
    assert resolve_residuals(F32Config(), "auto") == "inputs"
    assert resolve_residuals(F32Config(), "inputs") == "inputs"
    with pytest.raises(ValueError, match="float32 path keeps inputs only"):
        resolve_residuals(F32Config(), "states")
    with pytest.raises(ValueError, match="residuals must be"):
        resolve_residuals(BF16Config(), "everything")


def test_residuals_t_reruns_the_state_pass_in_the_backward():
    """residuals="t" keeps T only, so its backward reruns the state pass, which the bf16 default
    ("states") skips."""
    inputs = random_inputs(13, b=1, t=40, h=2, k=16, v=16)
    args = _args(inputs, jnp.bfloat16)

    def state_passes(**kw):
        grad = jax.grad(
            lambda *a: jnp.sum(gated_delta_rule_pallas(*a, interpret=True, **kw)[0]),
            argnums=range(5),
        )
        return str(jax.make_jaxpr(grad)(*args)).count("gdn_states")

    assert state_passes(residuals="t") > state_passes() == state_passes(residuals="states")


def test_default_config_follows_operand_dtype_and_head_dims(monkeypatch):
    assert default_config(jnp.bfloat16, 128, 128) == BF16Config()
    assert default_config(jnp.bfloat16, 64, 128) == BF16Config()
    assert default_config(jnp.bfloat16, 64, 64) == BF16_SMALL_HEADS
    assert BF16_SMALL_HEADS == BF16Config(warps_bwd_chunk=4)
    assert default_config(jnp.float32, 64, 64) == F32Config()
    # config=None: the op asks default_config about these operands' dtype and head dims, and
    # its kernels run with the answer. BF16_SMALL_HEADS differs from BF16Config() only in a
    # backward launch option, so forward outputs cannot tell them apart: spies on the op
    # module's default_config and call_options record what it asked and what it launched with.
    asked, launched = [], []

    def default_spy(*args):
        asked.append(args)
        return default_config(*args)

    def options_spy(**kwargs):
        launched.append(kwargs["config"])
        return call_options(**kwargs)

    monkeypatch.setattr(pallas_op, "default_config", default_spy)
    monkeypatch.setattr(pallas_op, "call_options", options_spy)
    inputs = random_inputs(13, b=1, t=16, h=1, k=16, v=32, with_state=False)
    gated_delta_rule_pallas(*_args(inputs, jnp.bfloat16), chunk_size=16, interpret=True)
    assert asked and all(a == (jnp.bfloat16, 16, 32) for a in asked), asked  # (dtype, K, V)
    assert launched == [BF16_SMALL_HEADS], launched


def test_rejects_unsupported_shapes_and_options():
    inputs = random_inputs(8, b=1, t=16, h=1, k=12, v=16, with_state=False)
    with pytest.raises(ValueError, match="power of two"):
        gated_delta_rule_pallas(*_args(inputs), interpret=True)
    inputs = random_inputs(8, b=1, t=16, h=1, k=16, v=16, with_state=False)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule_pallas(*_args(inputs), chunk_size=48, interpret=True)
    with pytest.raises(ValueError, match="float32 kernel path takes float32 operands"):
        gated_delta_rule_pallas(*_args(inputs, jnp.bfloat16), interpret=True, config=F32Config())
    with pytest.raises(ValueError, match="float32 path keeps inputs only"):
        gated_delta_rule_pallas(*_args(inputs), interpret=True, residuals="t")
    with pytest.raises(ValueError, match="block_v"):
        F32Config(block_v=24)
    with pytest.raises(ValueError, match="warps_bwd_chunk"):
        BF16Config(warps_bwd_chunk=6)
    with pytest.raises(ValueError, match="stages_bwd"):
        BF16Config(stages_bwd=0)
    with pytest.raises(ValueError, match="segment_programs"):
        BF16Config(segment_programs=-1)
    q = jnp.zeros((1, 16, 1, 16), jnp.float32)
    assert unsupported_reason(q, q, q, 64) is None
    assert "power of two" in unsupported_reason(q, q, jnp.zeros((1, 16, 1, 24)), 64)
    assert "float64" in unsupported_reason(np.zeros((1, 16, 1, 16)), q, q, 64)


# ----------------------------------------------------------------------------- compiled, GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, dtype, tol, d",
    [
        (F32Config(), jnp.float32, 1e-4, 128),
        (BF16Config(), jnp.bfloat16, 5e-3, 128),  # at this shape the state pass is segmented
        (UNSEGMENTED, jnp.bfloat16, 5e-3, 128),  # ... here not: the state pass forms kd
        (BF16Config(), jnp.float32, 1e-4, 128),  # the bfloat16 path's kernels with exact dots
        (None, jnp.bfloat16, 5e-3, 64),  # the default at head dim 64: BF16_SMALL_HEADS
    ],
    ids=[
        "f32path-float32",
        "bf16path-bfloat16",
        "bf16path_unsegmented-bfloat16",
        "bf16path-float32",
        "bf16path_default-bfloat16-d64",
    ],
)
def test_gpu_forward_and_gradients_match_reference(config, dtype, tol, d):
    b, t, h = 2, 300, 4
    inputs = random_inputs(9, b=b, t=t, h=h, k=d, v=d, g_min=-0.3)
    args = _args(inputs, dtype) + [jnp.asarray(inputs["initial_state"])]
    rng = np.random.default_rng(10)
    ct = (
        jnp.asarray(rng.standard_normal((b, t, h, d)), dtype),
        jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32),
    )

    def run(fn, xs, **kw):
        out, vjp = jax.vjp(
            lambda *a: fn(*a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw), *xs
        )
        return out, vjp((ct[0].astype(out[0].dtype), ct[1]))

    (o, s), grads = run(gated_delta_rule_pallas, args, interpret=False, config=config)
    with jax.default_matmul_precision("highest"):
        (ro, rs), rgrads = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    assert _l2_rel(o, ro) < tol and _l2_rel(s, rs) < tol
    for name, a, r in zip(NAMES + ("initial_state",), grads, rgrads, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _l2_rel(a, r) < 2 * tol, (name, _l2_rel(a, r))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [BF16Config(), UNSEGMENTED], ids=["default", "unsegmented"])
@pytest.mark.parametrize("b, t, h", [(2, 300, 4), (1, 256, 2)])
def test_gpu_primal_forward_matches_reference(config, b, t, h):
    """The forward outside differentiation, compiled, bf16: at these shapes the default's state
    pass segments, so it runs split; unsegmented it runs the fused pass at a halved value block
    (fused_programs); both against the fp32 reference at FLA's level."""
    d = 128
    inputs = random_inputs(13, b=b, t=t, h=h, k=d, v=d, g_min=-0.3)
    args = _args(inputs, jnp.bfloat16)
    s0 = jnp.asarray(inputs["initial_state"])
    run = jax.jit(
        lambda *a, **kw: gated_delta_rule_pallas(
            *a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw
        ),
        static_argnames=("interpret", "config"),
    )
    o, s = run(*args, s0, interpret=False, config=config)
    with jax.default_matmul_precision("highest"):
        ro, rs = gated_delta_rule_reference(
            *[x.astype(jnp.float32) for x in args], initial_state_bhkv=s0, output_final_state=True
        )
    assert _l2_rel(o, ro) < 5e-3 and _l2_rel(s, rs) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("residuals", ["auto", "t", "inputs"])
def test_gpu_api_pallas_residuals_give_the_same_gradients(residuals):
    """api.gated_delta_rule(impl="pallas", pallas_residuals=...) in bf16: what the forward keeps
    changes memory and speed only, so every choice matches the fp32 reference (5e-3, as above)."""
    from taylorcal_jax.ops.gdn import api

    b, t, h, d = 2, 300, 4, 128
    inputs = random_inputs(11, b=b, t=t, h=h, k=d, v=d, g_min=-0.3)
    args = _args(inputs, jnp.bfloat16)
    ct = jnp.asarray(np.random.default_rng(12).standard_normal((b, t, h, d)), jnp.bfloat16)

    def run(fn, xs, **kw):
        o, vjp = jax.vjp(lambda *a: fn(*a, **kw)[0], *xs)
        return o, vjp(ct.astype(o.dtype))

    o, grads = run(api.gated_delta_rule, args, impl="pallas", pallas_residuals=residuals)
    with jax.default_matmul_precision("highest"):
        ro, rgrads = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    assert _l2_rel(o, ro) < 5e-3
    for name, a, r in zip(NAMES, grads, rgrads, strict=True):
        assert _l2_rel(a, r) < 1e-2, (name, _l2_rel(a, r))


def _triton_kernels_of_a_gradient(dtype, config, residuals, t=1024):
    """Triton kernels in the op's gradient exported for "cuda" (Pallas's Triton lowering runs at
    export, checking every block shape, load, dot and store; no GPU needed)."""
    module = exported_gradient_module(
        gated_delta_rule_pallas, "cuda", dtype, t, config=config, residuals=residuals
    )
    return module.count(TRITON_CALL)


@pytest.mark.parametrize(
    "dtype, config, residuals",
    [
        (jnp.float32, F32Config(), "inputs"),
        (jnp.bfloat16, BF16Config(), "inputs"),
        (jnp.bfloat16, BF16Config(), "t"),
        (jnp.bfloat16, BF16Config(), "states"),
    ],
    ids=["f32", "bf16-inputs", "bf16-t", "bf16-states"],
)
def test_forward_and_backward_lower_to_triton_for_a_gpu(dtype, config, residuals):
    # Qwen2.5-1.5B's GDN head dims (K = V = 128); 16 chunks on 2 (b, h) rows x 2 V-blocks: a grid
    # small enough that the bf16 state pass and reverse recurrence run segmented
    assert _triton_kernels_of_a_gradient(dtype, config, residuals) > 0


def test_segmented_passes_add_their_segment_end_kernels_in_the_triton_lowering():
    segmented = _triton_kernels_of_a_gradient(jnp.bfloat16, BF16Config(), "states")
    whole = _triton_kernels_of_a_gradient(jnp.bfloat16, BF16Config(segment_programs=0), "states")
    assert segmented > whole > 0


@pytest.mark.parametrize("chunk", [32, 64])
def test_bf16_path_runs_under_64_bit_mode(chunk):
    # the T inverse's block indices stay int32 where 64-bit mode makes Python ints int64
    d = random_inputs(0, b=1, t=20, h=1, k=16, v=16)
    args = [jnp.asarray(d[n], jnp.bfloat16) for n in ("q", "k", "v")]
    args += [jnp.asarray(d["g"], jnp.float32), jnp.asarray(d["beta"], jnp.bfloat16)]
    want, _ = gated_delta_rule_pallas(*args, chunk_size=chunk, interpret=True)
    with jax.enable_x64(True):
        got, _ = gated_delta_rule_pallas(*args, chunk_size=chunk, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
