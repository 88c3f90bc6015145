"""Phase-1 closed-form calibration: known answers on synthetic statistics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import taylor
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.ops.gdn.step_inputs import gates as gdn_gates

MC = tiny_model_config(intermediate_size=64)
GDN = GDNConfig.from_teacher(MC)
MIXER = StudentMixer(GDN, GDNRuntime(impl="reference"))
# With the short convolution a right-padded token's q mixes in the valid tokens before it, so
# the GDN output O there is nonzero (without it, or left-padded, O is exactly 0 at padding).
CONV_MIXER = StudentMixer(dataclasses.replace(GDN, use_short_conv=True), MIXER.runtime)


def consts(rule="release"):
    return taylor.TaylorConstants(
        gamma_min=1e-3,
        gamma_max=5.0,
        beta_min=0.3,
        beta_span=0.4,
        entropy_span_floor=1e-3,
        sigma_min=0.1,
        sigma_max=10.0,
        gate_damping=0.01,
        write_gate=rule,
        a_proj_scale=0.0,
    )


def setup(seed=0, n=2, t=12, mixer=MIXER, right_padded=False):
    kx, kp, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, t, MC.hidden_size)) + 0.5  # nonzero mean direction
    params = mixer.module(MC).init(kp, x)["params"]
    ctx = jax.random.normal(kc, (n, t, GDN.num_heads, GDN.head_v_dim))
    pad = slice(t - 3, t) if right_padded else slice(0, 3)
    valid = jnp.ones((n, t), bool).at[0, pad].set(False)
    return params, x, ctx, valid


def run(params, x, ctx, valid, dist, ent, rule="release", mixer=MIXER):
    return taylor.calibrate_layer(
        params,
        x,
        ctx,
        valid,
        jnp.asarray(dist, jnp.float32),
        jnp.asarray(ent, jnp.float32),
        model_config=MC,
        mixer=mixer,
        consts=consts(rule),
    )


def test_half_life_equals_attention_distance():
    params, x, ctx, valid = setup()
    dist = [1.0, 3.0, 17.0, 1e6]  # the last one clips at gamma_min
    p, diag = run(params, x, ctx, valid, dist, [0.1, 0.2, 0.3, 0.4])
    a = x @ p["a_proj"]["kernel"]  # a_proj_scale = 0 -> x Wa = 0 exactly
    assert float(jnp.max(jnp.abs(a))) == 0.0
    g, _ = gdn_gates(a, a, p["A_log"], p["dt_bias"])  # [N, T, H], same at every token
    for h, d in enumerate(dist[:3]):
        # a head that looks d tokens back keeps half of its memory after d tokens
        np.testing.assert_allclose(np.exp(np.asarray(g[..., h]) * d), 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(-g[..., 3]), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(diag["half_life"][:3], dist[:3], rtol=1e-5)
    np.testing.assert_allclose(p["A_log"], 0.0)


@pytest.mark.parametrize("rule", ["release", "mean_direction"])
def test_entropy_ordering_gives_beta_ordering(rule):
    params, x, ctx, valid = setup()
    ent = jnp.array([2.0, 0.1, 1.0, 0.5])
    p, diag = run(params, x, ctx, valid, [2.0] * 4, ent, rule)
    beta = np.asarray(diag["beta_target"])
    np.testing.assert_allclose(beta[[1, 0]], [0.7, 0.3], rtol=1e-6)  # sharpest, flattest
    order = np.argsort(np.asarray(ent))
    assert np.all(np.diff(beta[order]) < 0)  # lower entropy -> stronger write
    logit = np.log(beta / (1 - beta))
    wb = np.asarray(p["b_proj"]["kernel"])
    if rule == "release":
        # published rule: mean |w_h| = logit(beta_h) / sqrt(fan_in), sign included
        np.testing.assert_allclose(
            np.mean(np.abs(wb), 0), np.abs(logit) / math.sqrt(MC.hidden_size), rtol=1e-5
        )
        w0 = np.asarray(params["b_proj"]["kernel"])
        assert np.all(np.sign(wb) == np.sign(w0) * np.sign(logit)[None, :])
    else:
        # improvement: the mean input maps exactly to logit(beta_h)
        w = np.asarray(valid, np.float32)[..., None]
        mu = np.sum(np.asarray(x) * w, (0, 1)) / w.sum()
        np.testing.assert_allclose(mu @ wb, logit, rtol=1e-4, atol=1e-6)
        assert np.all(np.diff(np.asarray(diag["beta_mean"])[order]) < 0)


def test_equal_entropies_give_the_top_write_strength():
    params, x, ctx, valid = setup()
    _, diag = run(params, x, ctx, valid, [2.0] * 4, [1.0] * 4)
    np.testing.assert_allclose(diag["beta_target"], 0.7, rtol=1e-6)


@pytest.mark.parametrize("mixer", [MIXER, CONV_MIXER], ids=["left_padded", "conv_right_padded"])
def test_value_scale_recovers_planted_scale_and_output_gate(mixer):
    conv = mixer is CONV_MIXER
    params, x, ctx, valid = setup(seed=3, mixer=mixer, right_padded=conv)
    dist, ent = [1.5, 4.0, 9.0, 2.0], [0.3, 0.9, 1.2, 0.1]
    p1, _ = run(params, x, ctx, valid, dist, ent, mixer=mixer)
    # O with the calibrated gates and the unscaled Wv, exactly what calibrate_layer fits
    gates = {**p1, "v_proj": params["v_proj"]}
    o, _ = taylor.gdn_outputs(gates, x, valid, model_config=MC, mixer=mixer)
    pad = ~np.asarray(valid)
    # left-padded without conv, O is 0 at padding; right-padded with conv it is not (|O| up
    # to ~0.08 there, rms ~0.02 at valid tokens), so the fit must leave padding out itself
    assert (np.max(np.abs(np.asarray(o)[pad])) > 1e-3) == conv
    planted = jnp.array([0.37, 2.5, 7.0, 40.0])  # the last is outside [0.1, 10]
    # large noise at padding (0.1, vs |planted O| ~0.01 to 1): a fit over all tokens moves
    # sigma_raw by 2% to 30% in the conv case (head 3, of the largest planted scale, ~1e-4)
    noise = 0.1 * jax.random.normal(jax.random.PRNGKey(9), o.shape)
    c = o * planted[None, None, :, None] + jnp.where(valid[..., None, None], 0.0, noise)
    p2, diag = run(params, x, c, valid, dist, ent, mixer=mixer)
    np.testing.assert_allclose(diag["sigma_raw"], planted, rtol=1e-4)
    np.testing.assert_allclose(diag["sigma"], [0.37, 2.5, 7.0, 10.0], rtol=1e-4)
    wv0 = np.asarray(params["v_proj"]["kernel"]).reshape(MC.hidden_size, 4, 8)
    wv = np.asarray(p2["v_proj"]["kernel"]).reshape(MC.hidden_size, 4, 8)
    np.testing.assert_allclose(wv, wv0 * np.asarray(diag["sigma"])[None, :, None], rtol=1e-5)
    # output gate: Wg = alpha Wv with alpha = 0.01 rms(C) / rms(silu(x Wv)) over valid tokens
    m = np.asarray(valid)
    rms_c = np.sqrt(np.mean(np.asarray(c)[m] ** 2))
    sv = np.asarray(jax.nn.silu(x @ p2["v_proj"]["kernel"]))[m]
    alpha = 0.01 * rms_c / np.sqrt(np.mean(sv**2))
    np.testing.assert_allclose(p2["g_proj"]["kernel"], alpha * p2["v_proj"]["kernel"], rtol=1e-4)
    # untouched parts
    for name in ("q_proj", "k_proj", "o_proj", "o_norm"):
        assert jax.tree.all(jax.tree.map(np.array_equal, p2[name], params[name]))


def test_taylor_init_on_a_copy_student_equals_per_layer_calls():
    from taylorcal_jax.calibrate.stats import collect
    from taylorcal_jax.convert.naive import copy_init
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import Transformer, init_params

    cfg = tiny_model_config(model_type="qwen2", vocab_size=40, num_hidden_layers=3)
    teacher = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, cfg.vocab_size)
    # statistics of the converted layers only, in the other order: row r is layer (2, 0)[r],
    # so taylor_init must find each layer's row (stats.index), not take row = layer
    stats = collect(Transformer(cfg), teacher, cfg, tokens, layers=(2, 0), block_size=4)
    sc = StudentConfig.from_teacher(cfg, (1,), mixer="gdn")
    assert sc.converted_layers == (0, 2) and [stats.index(i) for i in (0, 2)] == [1, 0]
    mixer = sc.student_mixer(GDNRuntime(impl="reference"))
    student = copy_init(teacher, sc, jax.random.PRNGKey(2))
    new, diag = taylor.taylor_init(
        student, stats, sc.converted_layers, model_config=cfg, mixer=mixer, consts=consts()
    )
    assert diag["sigma"].shape == (2, 4)
    for row, layer in enumerate(sc.converted_layers):
        r = stats.index(layer)
        want, want_diag = taylor.calibrate_layer(
            student[f"layers_{layer}"]["gdn"],
            stats.x_lntd[r],
            stats.context_lnthd[r],
            stats.valid_nt,
            stats.distance_lh[r],
            stats.entropy_lh[r],
            model_config=cfg,
            mixer=mixer,
            consts=consts(),
        )
        got = new[f"layers_{layer}"]["gdn"]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)
        # diagnostics come in the order of `layers` (row), whatever the statistics' order
        np.testing.assert_allclose(diag["distance"][row], want_diag["distance"], rtol=1e-6)
    assert new["layers_1"] is student["layers_1"]  # kept layer untouched
    logits, _, _ = sc.model(runtime=mixer.runtime).apply({"params": new}, tokens)
    assert np.all(np.isfinite(logits))


def test_bad_rule_is_rejected():
    with pytest.raises(ValueError, match="write_gate"):
        consts("centre")
