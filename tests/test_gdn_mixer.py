"""GatedDeltaNet mixer: against a NumPy transcription of docs/method.md, decoding, padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.models.mixers import gdn
from taylorcal_jax.models.mixers.gdn import GatedDeltaNet, GDNConfig, GDNRuntime, init_gdn_cache
from taylorcal_jax.ops.gdn import step_inputs

D, H, HEAD = 16, 2, 8

CONFIG = tiny_model_config(
    vocab_size=32,
    hidden_size=D,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=H,
    num_key_value_heads=1,
    head_dim=HEAD,
)


def _gdn(conv: bool) -> GDNConfig:
    return GDNConfig.from_teacher(CONFIG, use_short_conv=conv)


def _init(conv: bool, seed=0, impl="reference", fused=True):
    runtime = GDNRuntime(impl=impl, chunk_size=4, fused_projections=fused)
    mixer = GatedDeltaNet(CONFIG, _gdn(conv), runtime)
    x = jnp.zeros((1, 3, D))
    params = mixer.init(jax.random.PRNGKey(seed), x)["params"]
    # Make the gates non-trivial: random o_norm scale, larger a/b weights.
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(np.asarray, params)
    params["o_norm"]["scale"] = rng.uniform(0.5, 1.5, HEAD).astype(np.float32)
    params["a_proj"]["kernel"] = params["a_proj"]["kernel"] * 3
    params["b_proj"]["kernel"] = params["b_proj"]["kernel"] * 3
    return mixer, params


def _numpy_gdn(params, x, conv: bool, eps=1e-5):
    """Per-token float64 loop of the mixer of docs/method.md, independent of the module."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape

    def silu(z):
        return z / (1 + np.exp(-z))

    def proj(name, z):
        return z @ p[f"{name}_proj"]["kernel"]

    qkv = {n: proj(n, x) for n in "qkv"}
    if conv:
        for n in "qkv":
            w = p[f"{n}_conv"]["kernel"]  # [W, C]; w[-1] multiplies the current token
            width = w.shape[0]
            z = qkv[n]
            out = np.zeros_like(z)
            for i in range(t):
                for j in range(width):
                    src = i - (width - 1) + j
                    if src >= 0:
                        out[:, i] += w[j] * z[:, src]
            qkv[n] = out
    q, k, v = (silu(qkv[n]).reshape(b, t, H, HEAD) for n in "qkv")
    beta = 1 / (1 + np.exp(-proj("b", x)))
    g = -np.exp(p["A_log"]) * np.log1p(np.exp(proj("a", x) + p["dt_bias"]))
    gate = proj("g", x).reshape(b, t, H, HEAD)
    o = np.zeros((b, t, H, HEAD))
    for bi in range(b):
        for hi in range(H):
            s = np.zeros((HEAD, HEAD))
            for ti in range(t):
                qt = q[bi, ti, hi] / np.sqrt(q[bi, ti, hi] @ q[bi, ti, hi] + 1e-6)
                kt = k[bi, ti, hi] / np.sqrt(k[bi, ti, hi] @ k[bi, ti, hi] + 1e-6)
                s = np.exp(g[bi, ti, hi]) * s
                s = s + beta[bi, ti, hi] * np.outer(kt, v[bi, ti, hi] - s.T @ kt)
                o[bi, ti, hi] = (s.T @ qt) * HEAD**-0.5
    rms = np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + eps)
    y = (o / rms) * p["o_norm"]["scale"] * silu(gate)
    return o, y.reshape(b, t, H * HEAD) @ p["o_proj"]["kernel"]


def _apply(mixer, params, x, **kw):
    fn = jax.jit(mixer.apply, static_argnames="return_intermediates")
    return fn({"params": params}, x, **kw)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "conv,impl", [(False, "reference"), (True, "reference"), (True, "chunked")]
)
def test_mixer_matches_numpy(conv, impl):
    mixer, params = _init(conv, impl=impl)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, D))
    y, cache, inter = _apply(mixer, params, x, return_intermediates=True)
    o_ref, y_ref = _numpy_gdn(params, x, conv)
    assert cache is None
    assert y.shape == (2, 7, D) and inter["attn_context"].shape == (2, 7, H, HEAD)
    assert _rel(inter["attn_context"], o_ref) < 1e-5
    assert _rel(y, y_ref) < 1e-5
    np.testing.assert_array_equal(inter["attn_out"], y)


def test_bfloat16_close_to_float32():
    mixer, params = _init(True, impl="chunked")
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 9, D))
    y32, _, _ = _apply(mixer, params, x)
    mixer16 = GatedDeltaNet(CONFIG, mixer.gdn, mixer.runtime, dtype=jnp.bfloat16)
    cache = init_gdn_cache(CONFIG, mixer.gdn, 2, jnp.bfloat16)
    y16, cache, _ = _apply(mixer16, params, x, cache=cache)
    assert y16.dtype == jnp.bfloat16 and cache["state"].dtype == jnp.float32
    assert cache["conv"]["q"].dtype == jnp.bfloat16
    assert _rel(y16, y32) < 3e-2


def test_param_layout():
    _, params = _init(True)
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes["q_proj"]["kernel"] == (D, H * HEAD)
    assert shapes["v_proj"]["kernel"] == (D, H * HEAD)
    assert shapes["a_proj"]["kernel"] == (D, H) and shapes["b_proj"]["kernel"] == (D, H)
    assert shapes["o_proj"]["kernel"] == (H * HEAD, D)
    assert shapes["A_log"] == (H,) and shapes["dt_bias"] == (H,)
    assert shapes["o_norm"]["scale"] == (HEAD,)
    assert shapes["q_conv"]["kernel"] == (4, H * HEAD)
    _, params = _init(False)
    assert "q_conv" not in params


def test_standard_init_ranges():
    mixer = GatedDeltaNet(CONFIG, _gdn(False))
    params = mixer.init(jax.random.PRNGKey(3), jnp.zeros((1, 2, D)))["params"]
    a = np.exp(np.asarray(params["A_log"]))
    assert np.all((a > 0) & (a <= 16))
    dt = np.log1p(np.exp(np.asarray(params["dt_bias"], np.float64)))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5)))
    np.testing.assert_array_equal(params["o_norm"]["scale"], np.ones(HEAD))


@pytest.mark.parametrize("conv", [False, True])
def test_decode_and_chunked_prefill_equal_full_forward(conv):
    mixer, params = _init(conv)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 6, D))
    y_full, _, _ = _apply(mixer, params, x)
    apply = jax.jit(lambda xs, c: mixer.apply({"params": params}, xs, cache=c))
    # Prefill 2 tokens, one continuation chunk of 2, then 2 single-token steps.
    cache = init_gdn_cache(CONFIG, mixer.gdn, 2)
    outs = []
    for lo, hi in ((0, 2), (2, 4), (4, 5), (5, 6)):
        y, cache, _ = apply(x[:, lo:hi], cache)
        outs.append(y)
    assert _rel(jnp.concatenate(outs, axis=1), y_full) < 1e-5
    assert cache["state"].dtype == jnp.float32


@pytest.mark.parametrize("conv", [False, True])
def test_left_padding_equals_alone_and_decode_continues(conv):
    mixer, params = _init(conv)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 6, D))
    valid = jnp.array([[True] * 6, [False, False, False, True, True, True]])
    garbage = jnp.where(valid[..., None], x, 100.0)  # padding content must not matter
    cache = init_gdn_cache(CONFIG, mixer.gdn, 2)
    y, cache, _ = _apply(mixer, params, garbage, valid_bt=valid, cache=cache)
    y_alone, cache_alone, _ = _apply(
        mixer, params, x[1:, 3:], cache=init_gdn_cache(CONFIG, mixer.gdn, 1)
    )
    assert _rel(y[1, 3:], y_alone[0]) < 1e-5
    np.testing.assert_array_equal(y[1, :3], 0.0)
    # One more decoded token continues both rows correctly.
    nxt = jax.random.normal(jax.random.PRNGKey(5), (2, 1, D))
    y2, _, _ = _apply(mixer, params, nxt, cache=cache)
    y2_alone, _, _ = _apply(mixer, params, nxt[1:], cache=cache_alone)
    full, _, _ = _apply(mixer, params, jnp.concatenate([x[1:, 3:], nxt[1:]], 1))
    assert _rel(y2[1], y2_alone[0]) < 1e-5
    assert _rel(y2_alone[0], full[0, -1:]) < 1e-5


def test_right_padding_then_decode():
    """Right padding (prompt shorter than the batch's) leaves state and conv history intact."""
    mixer, params = _init(True)
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 5, D))
    valid = jnp.array([[True, True, True, False, False]])
    _, cache, _ = _apply(
        mixer, params, x, valid_bt=valid, cache=init_gdn_cache(CONFIG, mixer.gdn, 1)
    )
    nxt = jax.random.normal(jax.random.PRNGKey(7), (1, 1, D))
    y, _, _ = _apply(mixer, params, nxt, cache=cache)
    full, _, _ = _apply(mixer, params, jnp.concatenate([x[:, :3], nxt], 1))
    assert _rel(y[0], full[0, -1:]) < 1e-5
    # An invalid decode step changes nothing.
    _, cache2, _ = _apply(mixer, params, nxt, valid_bt=jnp.array([[False]]), cache=cache)
    jax.tree_util.tree_map(np.testing.assert_array_equal, cache2, cache)


def test_fused_projections_same_params_same_mixer():
    """runtime.fused_projections joins the q/k/v/g kernels (and a/b) into one product each:
    the same parameter tree at init, the numpy mixer in fp32, the separate products' outputs,
    decoding steps and gradients within fp32 rounding, and bf16 within bf16 rounding."""
    fused_rt = GDNRuntime(impl="chunked", chunk_size=4, fused_projections=True)
    mixer, params = _init(True, impl="chunked", fused=False)  # six separate products
    fused = GatedDeltaNet(CONFIG, mixer.gdn, fused_rt)
    x0 = jnp.zeros((1, 3, D))
    p_sep, p_fused = (m.init(jax.random.PRNGKey(5), x0)["params"] for m in (mixer, fused))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_fused, p_sep)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 7, D))
    y_sep, _, _ = _apply(mixer, params, x)
    y_fused, _, _ = _apply(fused, params, x)
    assert _rel(y_fused, y_sep) < 1e-6
    assert _rel(y_fused, _numpy_gdn(params, x, True)[1]) < 1e-5
    # decoding steps from a two-token prefill
    outs = {}
    for name, m in (("sep", mixer), ("fused", fused)):
        apply = jax.jit(lambda xs, c, m=m: m.apply({"params": params}, xs, cache=c))
        cache, ys = init_gdn_cache(CONFIG, m.gdn, 2), []
        for lo, hi in ((0, 2), (2, 3), (3, 4), (4, 5)):
            y, cache, _ = apply(x[:, lo:hi], cache)
            ys.append(y)
        outs[name] = (jnp.concatenate(ys, axis=1), cache["state"])
    assert _rel(outs["fused"][0], outs["sep"][0]) < 1e-6
    assert _rel(outs["fused"][1], outs["sep"][1]) < 1e-6

    def loss(p, m):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x)[0]))

    g_sep, g_fused = (jax.grad(loss)(params, m) for m in (mixer, fused))
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_sep), strict=True):
        assert _rel(a, b) < 1e-5
    assert jax.tree.structure(g_fused) == jax.tree.structure(g_sep)
    y16 = _apply(GatedDeltaNet(CONFIG, mixer.gdn, fused_rt, dtype=jnp.bfloat16), params, x)[0]
    assert y16.dtype == jnp.bfloat16 and _rel(y16, y_sep) < 3e-2
    # one product for q/k/v/g and one for a/b, in place of six
    jaxpr = str(jax.make_jaxpr(lambda p: fused.apply({"params": p}, x))(params))
    jaxpr_sep = str(jax.make_jaxpr(lambda p: mixer.apply({"params": p}, x))(params))
    assert jaxpr_sep.count("dot_general") - jaxpr.count("dot_general") == 4


def test_config_validation():
    with pytest.raises(ValueError, match="impl"):
        GDNRuntime(impl="fast")
    with pytest.raises(ValueError, match="fused_projections must be True or False"):
        GDNRuntime(fused_projections="yes")
    with pytest.raises(ValueError, match="pallas_residuals"):
        GDNRuntime(pallas_residuals="everything")
    with pytest.raises(ValueError, match="chunk_size"):
        GDNRuntime(chunk_size=0)
    with pytest.raises(ValueError, match="conv_size"):
        dataclasses.replace(_gdn(True), conv_size=1)
    with pytest.raises(ValueError, match="num_heads"):
        GDNConfig(num_heads=0, head_k_dim=4, head_v_dim=4)
    with pytest.raises(ValueError, match="set by the teacher"):
        GDNConfig.from_teacher(CONFIG, num_heads=3)
    with pytest.raises(ValueError, match="unknown GDNConfig keys"):
        GDNConfig.from_dict({**_gdn(True).to_dict(), "expand_v": 2})
    with pytest.raises(ValueError, match=r"unknown GDNConfig keys \['impl'\]"):
        GDNConfig.from_dict({**_gdn(True).to_dict(), "impl": "chunked"})  # runtime, not saved
    assert GDNConfig.from_dict(_gdn(True).to_dict()) == _gdn(True)


def test_param_groups():
    _, params = _init(True)
    labels = gdn.param_groups(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    by_part = {k: set(jax.tree.leaves(v)) for k, v in labels.items()}
    assert by_part == {
        **dict.fromkeys(("q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv"), {"slow"}),
        **dict.fromkeys(("a_proj", "b_proj", "g_proj", "A_log", "dt_bias"), {"fast"}),
        **dict.fromkeys(("o_proj", "o_norm"), {"frozen"}),
    }
    with pytest.raises(ValueError, match=r"unexpected GDN params \['extra'\]"):
        gdn.param_groups({**params, "extra": np.zeros(2)})


def test_diagnostics_half_life_and_write_gate():
    """half_life: the decay at x Wa = 0 halves the state in that many tokens; write_gate: the
    mean of sigmoid(x Wb) over valid tokens (checked against a loop over the valid tokens)."""
    _, params = _init(False)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 5, D)))
    valid = np.array([[True] * 5, [False, False, True, True, True]])
    diag = gdn.diagnostics(params, x, valid)
    assert diag["half_life"].shape == diag["write_gate"].shape == (H,)
    zero = jnp.zeros((1, 1, H))
    g, _ = step_inputs.gates(zero, zero, params["A_log"], params["dt_bias"])
    np.testing.assert_allclose(np.exp(np.asarray(g[0, 0], np.float64) * diag["half_life"]), 0.5,
                               rtol=1e-5)  # fmt: skip
    tokens = x[valid]  # [valid tokens, D]
    beta = 1 / (1 + np.exp(-(tokens.astype(np.float64) @ np.asarray(params["b_proj"]["kernel"]))))
    np.testing.assert_allclose(diag["write_gate"], beta.mean(0), rtol=1e-5)
