"""The Pallas gated delta rule (pallas_gpu.py): interpret mode on the CPU (CI), compiled on a GPU.

Tolerances (relative: max-abs error over max-abs of the expected value, gdn_testing.rel_err):
  fp32 interpret vs the fp64 NumPy loop (values, states)                 2e-5
  fp32 interpret gradients vs jax.vjp of the fp32 per-token reference   1e-4
  extreme gates (g down to -20, beta near 0 and 1), fp32 interpret      1e-4
  GPU, fp32 inputs (exact fp32 dots) vs the fp32 reference               1e-4
  GPU, bf16 inputs vs the fp32 reference on the same inputs (FLA's level, as ||.||_2 ratio) 5e-3
  bf16 gradients of the Pallas chunk-local backward, interpret mode (||.||_2 ratio)        2e-2
  backward="pallas" kernels vs the XLA closed form (chunk_local_bwd.py), fp32 interpret  1e-5
  T of kernel 1 "fla" (plain JAX, HIGHEST) vs an fp64 inverse                            1e-5
Shapes stay tiny (K, V in {16, 32}, T <= 200) to keep interpret mode fast.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import numpy_gated_delta_rule, random_inputs, rel_err

from taylorcal_jax.ops.gdn.config import BF16_DEFAULT, F32_DEFAULT, GDNPallasConfig, default_config
from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas, unsupported_reason
from taylorcal_jax.ops.gdn.pallas_gpu_chunk import t_inverse_fla
from taylorcal_jax.ops.gdn.pallas_gpu_segments import num_segments
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

NAMES = ("q", "k", "v", "g", "beta")
FUSED = GDNPallasConfig(forward="fused")
SPLIT = GDNPallasConfig(forward="split", block_v=16)
FLA = GDNPallasConfig(chunk_kernel="fla", block_v=16)
NORM_AFTER_DOT = GDNPallasConfig(chunk_kernel="fla", kd_in_states=True, norm_after_dot=True)
FUSED_PRIMAL = dataclasses.replace(NORM_AFTER_DOT, fused_primal=True)


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _args(inputs, dtype=jnp.float32):
    return [jnp.asarray(inputs[n], jnp.float32 if n == "g" else dtype) for n in NAMES]


def _pallas(inputs, *, chunk_size=64, config=FUSED, interpret=True, dtype=jnp.float32, state=True):
    s0 = inputs.get("initial_state") if state else None
    return gated_delta_rule_pallas(
        *_args(inputs, dtype),
        initial_state_bhkv=None if s0 is None else jnp.asarray(s0),
        output_final_state=True,
        chunk_size=chunk_size,
        interpret=interpret,
        config=config,
    )


@pytest.mark.parametrize(
    "t, k, v, chunk_size, config",
    [
        (200, 32, 32, 64, SPLIT),
        (37, 16, 32, 16, FUSED),
        (50, 32, 16, 32, FUSED),
        (70, 16, 16, 64, FLA),
        (190, 32, 32, 16, GDNPallasConfig(state_segments=4, block_v=16)),
        (90, 32, 32, 32, GDNPallasConfig(kd_in_states=True, block_v=16)),  # kd formed in pass
        # norms applied after the dots in kernel 1 and the output kernel
        (130, 32, 32, 32, NORM_AFTER_DOT),
        # ... segmented, where kernel 1 writes kd (its older body) for the state pass
        (190, 32, 32, 16, dataclasses.replace(NORM_AFTER_DOT, state_segments=4, block_v=16)),
        # chunk i+1's tiles loaded during chunk i: unsegmented, and segmented
        (130, 32, 32, 16, GDNPallasConfig(kd_in_states=True, prefetch_programs=8, block_v=16)),
        (190, 32, 32, 16, GDNPallasConfig(state_segments=4, prefetch_programs=64, block_v=16)),
        # the fused pass for the primal forward of the split configuration; at a halved V block
        (130, 32, 32, 32, FUSED_PRIMAL),
        (130, 32, 32, 32, dataclasses.replace(FUSED_PRIMAL, fused_programs=8)),
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
    "backward, chunk_kernel, reverse, extra",
    [
        ("xla", "keep", "fused", {}),
        ("pallas", "fla", "split", {}),
        ("pallas", "fla", "fused", {}),
        ("xla", "keep", "split", {}),
        ("analytic", "fla", "split", {}),
        ("analytic", "fla", "fused", {}),
        # the forward keeps T (and h, v'): the backward's prep kernel instead of kernel 1
        ("pallas", "fla", "split", {"residuals": "t"}),
        ("pallas", "fla", "split", {"residuals": "states"}),
        ("pallas", "fla", "fused", {"residuals": "states"}),
        ("analytic", "fla", "split", {"residuals": "t", "forward": "fused"}),
        # the state pass forms kd from k (unsegmented only; kernel 1 then writes no kd)
        ("pallas", "fla", "split", {"residuals": "states", "kd_in_states": True, "segments": 1}),
        ("pallas", "fla", "split", {"residuals": "t", "norm_after_dot": True, "segments": 1}),
        # ... segmented: kernel 1 writes kd (older body), the output kernel scales after dots
        (
            "pallas",
            "fla",
            "split",
            {"residuals": "states", "kd_in_states": True, "norm_after_dot": True},
        ),
        # prefetching sequential kernels: segmented reverse, and the unsegmented state recompute
        ("pallas", "fla", "split", {"prefetch_programs": 64}),
        ("pallas", "fla", "split", {"prefetch_programs": 64, "segments": 1}),
        # residuals "inputs": the vjp's forward keeps nothing, so fused_primal runs there too
        ("pallas", "fla", "split", {"fused_primal": True, "segments": 1}),
    ],
)
def test_gradients_match_reference_vjp(backward, chunk_kernel, reverse, extra):
    extra = dict(extra)
    inputs = random_inputs(2, b=1, t=45, h=2, k=16, v=32)
    args = _args(inputs) + [jnp.asarray(inputs["initial_state"])]
    rng = np.random.default_rng(3)
    ct = (
        jnp.asarray(rng.standard_normal((1, 45, 2, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32),
    )

    def run(fn, **kw):
        return jax.vjp(
            lambda *a: fn(*a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw), *args
        )[1](ct)

    grads = run(
        gated_delta_rule_pallas,
        chunk_size=32,
        interpret=True,
        config=GDNPallasConfig(
            backward=backward,
            chunk_kernel=chunk_kernel,
            reverse=reverse,
            block_v=16,  # two V-blocks
            state_segments=extra.pop("segments", 0 if reverse == "split" else 1),
            **extra,
        ),
    )
    with jax.default_matmul_precision("highest"):
        ref = run(gated_delta_rule_reference)
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


@pytest.mark.parametrize(
    "config",
    [
        GDNPallasConfig(backward="pallas", chunk_kernel="fla"),
        GDNPallasConfig(backward="pallas", chunk_kernel="fla", reverse="split"),
        GDNPallasConfig(backward="analytic", chunk_kernel="fla", reverse="split"),
        dataclasses.replace(BF16_DEFAULT, norm_after_dot=True, prefetch_programs=64),
    ],
)
def test_pallas_backward_bf16_close_to_fp32_reference(config):
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

    grads = run(gated_delta_rule_pallas, args, chunk_size=32, interpret=True, config=config)
    with jax.default_matmul_precision("highest"):
        ref = run(gated_delta_rule_reference, [x.astype(jnp.float32) for x in args])
    for name, a, r in zip(NAMES + ("initial_state",), grads, ref, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _l2_rel(a, r) < 2e-2, (name, _l2_rel(a, r))


@pytest.mark.parametrize("config", [FLA, NORM_AFTER_DOT])
def test_forward_without_qk_l2_norm_matches_numpy_loop(config):
    inputs = random_inputs(6, b=1, t=70, h=2, k=16, v=32)
    args = _args(inputs)
    o, state = gated_delta_rule_pallas(
        *args, output_final_state=True, chunk_size=32, interpret=True, config=config,
        use_qk_l2norm=False,
    )  # fmt: skip
    o_np, state_np = numpy_gated_delta_rule(**{n: inputs[n] for n in NAMES}, use_qk_l2norm=False)
    assert rel_err(o, o_np) < 2e-5
    assert rel_err(state, state_np) < 2e-5


@pytest.mark.parametrize("use_l2, chunk", [(True, 32), (False, 16)])
def test_pallas_chunk_local_backward_equals_xla_closed_form(use_l2, chunk):
    """backward="pallas"'s two kernels vs chunk_local_bwd.chunk_local_backward on random
    cotangents (fp32, interpret mode): the same formulas, so equal up to rounding."""
    from taylorcal_jax.ops.gdn import pallas_gpu as pg
    from taylorcal_jax.ops.gdn.chunk_local_bwd import chunk_local_backward
    from taylorcal_jax.ops.gdn.pallas_gpu_bwd import chunk_local_backward_call

    b, tp, h, kd, vd = 1, 2 * chunk, 2, 16, 32
    rng = np.random.default_rng(14)

    def rnd(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = rnd(b, tp, h, kd), rnd(b, tp, h, kd), rnd(b, tp, h, vd)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (b, tp, h)), jnp.float32)
    g = jnp.asarray(rng.uniform(-2.0, 0.0, (b, tp // chunk, chunk, h)), jnp.float32)
    gcum = jnp.cumsum(g, axis=2).reshape(b, tp, h)
    # any [C, C] per chunk will do for an equality check; lower-triangular like T
    tmat = jnp.tril(rnd(b, tp // chunk, h, chunk, chunk)) + jnp.eye(chunk)
    tmat = jnp.swapaxes(tmat, 2, 3).reshape(b, tp, h, chunk)
    causal = (jnp.arange(tp) % chunk)[None, :, None, None] >= jnp.arange(chunk)
    dw, dqg, dkd = rnd(b, tp, h, kd), rnd(b, tp, h, kd), rnd(b, tp, h, kd)
    du, daqk, dlgc = rnd(b, tp, h, vd), jnp.where(causal, rnd(b, tp, h, chunk), 0.0), rnd(b, tp, h)
    st = pg._Static(
        chunk=chunk,
        scale=kd**-0.5,
        use_l2=use_l2,
        interpret=True,
        cfg=GDNPallasConfig(backward="pallas", chunk_kernel="fla"),
    )
    cts = (q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc)
    got = chunk_local_backward_call(*cts, st=st, dt=jnp.float32)
    want = chunk_local_backward(*cts, chunk=chunk, scale=st.scale, use_l2=use_l2, dt=jnp.float32)
    for name, a, r in zip(NAMES, got, want, strict=True):
        assert a.shape == r.shape and a.dtype == jnp.float32, name
        assert rel_err(a, r) < 1e-5, (name, rel_err(a, r))


@pytest.mark.parametrize("chunk_size, config", [(32, FUSED), (64, FLA)])
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
def test_fla_inverse_matches_fp64_inverse(c, g_min, aligned):
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
    t = t_inverse_fla(jnp.asarray(a, jnp.float32), jax.lax.Precision.HIGHEST)
    assert rel_err(t, expected) < 1e-5


def test_num_segments_divides_chunks_and_targets_one_program_per_sm():
    assert num_segments(0, 32, 512) == 4  # 1 x 32768 x 16, BV 64: 32 programs -> 128
    assert num_segments(0, 256, 64) == 1  # 8 x 4096 x 16: already 256 programs
    assert num_segments(8, 1, 12) == 6 and num_segments(3, 1, 13) == 1
    assert num_segments(1, 1, 64) == 1


def test_prefetch_only_where_the_sequential_grid_fits_prefetch_programs():
    from taylorcal_jax.ops.gdn import pallas_gpu as pg

    def rule(cfg, programs):
        st = pg._Static(chunk=64, scale=1.0, use_l2=True, interpret=True, cfg=cfg)
        return pg.seq_launch("gdn_states", st, programs, cfg.warps_seq, jnp.bfloat16)[0]

    on = GDNPallasConfig(prefetch_programs=128)
    assert rule(on, 128) and rule(on, 32) and not rule(on, 129)
    assert not rule(GDNPallasConfig(), 1)  # 0 = never


def test_fused_block_v_halves_until_enough_programs():
    from taylorcal_jax.ops.gdn import pallas_gpu as pg

    def bv(cfg, b, h, vd=128):
        st = pg._Static(chunk=64, scale=1.0, use_l2=True, interpret=True, cfg=cfg)
        return pg.fused_block_v(st, b, h, vd)

    cfg = GDNPallasConfig(fused_programs=256)
    assert bv(cfg, 8, 16) == 64 and bv(cfg, 4, 16) == 32 and bv(cfg, 16, 12) == 64
    assert bv(cfg, 1, 1) == 16 and bv(cfg, 1, 1, vd=16) == 16
    assert bv(GDNPallasConfig(), 1, 1) == 64  # 0 = block_v as it is


def test_kd_in_states_only_where_the_state_pass_is_unsegmented():
    from taylorcal_jax.ops.gdn import pallas_gpu as pg

    st = pg._Static(
        chunk=64,
        scale=1.0,
        use_l2=True,
        interpret=True,
        cfg=GDNPallasConfig(state_segments=0, kd_in_states=True),
    )
    rows = {(8, 4096, 16): True, (4, 8192, 16): True, (1, 32768, 16): False, (16, 2048, 12): True}
    for (b, t, h), expected in rows.items():  # 1 x 32768 x 16: 32 programs, so 4 segments
        assert pg._state_pass_unsegmented(st, b, t, h, 128, 128) is expected, (b, t, h)


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
        GDNPallasConfig(forward="fused", block_v=16),
        GDNPallasConfig(state_segments=0, block_v=16),  # segmented: the scan starts at zeros
        GDNPallasConfig(**{**BF16_DEFAULT.__dict__, "block_v": 16, "state_segments": 1}),
    ],
)
def test_no_initial_state_starts_from_zero(config):
    """Without an initial state the sequential kernels start from zero (no zeros array is made
    or read): outputs, final states and gradients as with explicit zeros."""
    inputs = random_inputs(8, b=2, t=40, h=3, k=16, v=32, with_state=False)
    args = _args(inputs)
    zeros = jnp.zeros((2, 3, 16, 32), jnp.float32)
    rng = np.random.default_rng(9)
    ct = (
        jnp.asarray(rng.standard_normal((2, 40, 3, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 3, 16, 32)), jnp.float32),
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


def test_config_with_residuals_overrides_the_default_or_says_why_not():
    from taylorcal_jax.ops.gdn.config import config_with_residuals

    assert config_with_residuals(jnp.bfloat16) is BF16_DEFAULT
    lighter = config_with_residuals(jnp.bfloat16, "t")
    assert lighter.residuals == "t" and lighter == GDNPallasConfig(
        **{**BF16_DEFAULT.__dict__, "residuals": "t"}
    )
    assert config_with_residuals(jnp.float32, "inputs") is F32_DEFAULT
    with pytest.raises(ValueError, match="float32 inputs keeps the inputs only"):
        config_with_residuals(jnp.float32, "states")


def test_residuals_argument_picks_the_default_with_those_residuals():
    """residuals="t" keeps T only, so its backward reruns the state pass, which the bf16
    default ("states") skips; gradients as with the equivalent explicit config."""
    inputs = random_inputs(13, b=1, t=40, h=2, k=16, v=16)
    args = _args(inputs, jnp.bfloat16)

    def grad_fn(**kw):
        return jax.grad(
            lambda *a: jnp.sum(gated_delta_rule_pallas(*a, interpret=True, **kw)[0]),
            argnums=range(5),
        )

    def state_passes(**kw):
        return str(jax.make_jaxpr(grad_fn(**kw))(*args)).count("gdn_states")

    assert state_passes(residuals="t") > state_passes()
    light = GDNPallasConfig(**{**BF16_DEFAULT.__dict__, "residuals": "t"})
    for a, b in zip(grad_fn(residuals="t")(*args), grad_fn(config=light)(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="pass one or the other"):
        gated_delta_rule_pallas(*args, interpret=True, config=light, residuals="t")


def test_default_config_follows_operand_dtype():
    assert default_config(jnp.bfloat16) is BF16_DEFAULT and BF16_DEFAULT.backward == "pallas"
    assert default_config(jnp.float32) is F32_DEFAULT and F32_DEFAULT == GDNPallasConfig()
    inputs = random_inputs(13, b=1, t=40, h=2, k=16, v=16)
    args = _args(inputs, jnp.bfloat16)
    o_default, _ = gated_delta_rule_pallas(*args, chunk_size=16, interpret=True)
    o_named, _ = gated_delta_rule_pallas(*args, chunk_size=16, interpret=True, config=BF16_DEFAULT)
    np.testing.assert_array_equal(
        np.asarray(o_default, np.float32), np.asarray(o_named, np.float32)
    )


def test_rejects_unsupported_shapes_and_options():
    inputs = random_inputs(8, b=1, t=16, h=1, k=12, v=16, with_state=False)
    with pytest.raises(ValueError, match="power of two"):
        gated_delta_rule_pallas(*_args(inputs), interpret=True)
    inputs = random_inputs(8, b=1, t=16, h=1, k=16, v=16, with_state=False)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule_pallas(*_args(inputs), chunk_size=48, interpret=True)
    with pytest.raises(ValueError, match="block_v"):
        GDNPallasConfig(block_v=24)
    with pytest.raises(ValueError, match="state_segments"):
        GDNPallasConfig(state_segments=-1)
    with pytest.raises(ValueError, match="reverse"):
        GDNPallasConfig(reverse="both")
    with pytest.raises(ValueError, match="backward must"):
        GDNPallasConfig(backward="autodiff")
    with pytest.raises(ValueError, match="residuals must"):
        GDNPallasConfig(residuals="everything")
    with pytest.raises(ValueError, match="closed-form backward"):
        GDNPallasConfig(residuals="t")  # backward "xla" recomputes through jax.vjp
    with pytest.raises(ValueError, match="forward='split'"):
        GDNPallasConfig(residuals="states", forward="fused", backward="pallas", chunk_kernel="fla")
    with pytest.raises(ValueError, match="reads T from kernel 1"):
        GDNPallasConfig(backward="analytic", chunk_kernel="keep")
    with pytest.raises(ValueError, match="reads T from kernel 1"):
        GDNPallasConfig(backward="pallas")
    with pytest.raises(ValueError, match="t_precision"):
        GDNPallasConfig(chunk_kernel="fla", t_precision="fp8")
    with pytest.raises(ValueError, match="kd_in_states"):
        GDNPallasConfig(forward="fused", kd_in_states=True)
    with pytest.raises(ValueError, match="fused_programs"):
        GDNPallasConfig(fused_programs=-1)
    with pytest.raises(ValueError, match="prefetch_programs"):
        GDNPallasConfig(prefetch_programs=-128)
    q = jnp.zeros((1, 16, 1, 16), jnp.float32)
    assert unsupported_reason(q, q, q, 64) is None
    assert "power of two" in unsupported_reason(q, q, jnp.zeros((1, 16, 1, 24)), 64)
    assert "float64" in unsupported_reason(np.zeros((1, 16, 1, 16)), q, q, 64)


# ----------------------------------------------------------------------------- compiled, GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        FUSED,
        GDNPallasConfig(forward="split", block_v=64),
        GDNPallasConfig(backward="pallas", chunk_kernel="fla", stages_bwd=1),
        GDNPallasConfig(backward="pallas", chunk_kernel="fla", reverse="split", stages_bwd=1),
        GDNPallasConfig(state_segments=5),  # T = 300: 5 chunks, 5 segments
        GDNPallasConfig(chunk_kernel="fla", t_precision="tf32"),
        # session 2's bf16 default (bench candidate "analytic"), session 3's ("states_w4_tf32")
        GDNPallasConfig(
            backward="analytic",
            chunk_kernel="fla",
            reverse="split",
            state_segments=0,
            stages_bwd=1,
            warps_bwd=8,
        ),
        BF16_DEFAULT,
        # the default unsegmented (at this shape it segments), so that the state pass forms kd
        GDNPallasConfig(**{**BF16_DEFAULT.__dict__, "state_segments": 1}),
    ],
)
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 5e-3), (jnp.float32, 1e-4)])
def test_gpu_forward_and_gradients_match_reference(config, dtype, tol):
    b, t, h, d = 2, 300, 4, 128
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
@pytest.mark.parametrize(
    "config",
    [BF16_DEFAULT, dataclasses.replace(BF16_DEFAULT, state_segments=1)],
    ids=["default", "unsegmented"],
)
@pytest.mark.parametrize("b, t, h", [(2, 300, 4), (1, 256, 2)])
def test_gpu_primal_forward_matches_reference(config, b, t, h):
    """The forward outside differentiation, compiled, bf16: at these shapes the default's state
    pass segments, so it runs split; unsegmented it runs the fused pass (fused_primal) at a
    halved value block (fused_programs); both against the fp32 reference at FLA's level."""
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
