"""Phase-2 alignment: equal to a separate plain optax loop per layer; vmapped over layers,
sharded over 8 simulated devices == one device; an interrupted fit resumes bit-for-bit."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import align
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.utils import sharding

MC = tiny_model_config(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
)
GDN = StudentMixer(GDNConfig.from_teacher(MC), GDNRuntime(impl="chunked", chunk_size=8))
CFG = align.AlignConfig(
    steps=12, lr_qkv=1e-3, lr_gates=1e-2, weight_decay=0.01, clip_norm=1.0, checkpoint_every=0
)


@pytest.fixture(scope="module")
def inputs():
    """(stacked params of 3 layers, x, y, valid): sequence 0 has 5 padded tokens."""
    n_layers, n, t = 3, 4, 16
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n_layers, n, t, MC.hidden_size))
    y = 0.1 * jax.random.normal(ky, (n_layers, n, t, MC.hidden_size))
    trees = [
        GDN.module(MC).init(jax.random.PRNGKey(10 + i), x[0])["params"] for i in range(n_layers)
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    valid = jnp.ones((n, t), bool).at[0, :5].set(False)
    return stacked, x, y, valid


@pytest.fixture(scope="module")
def problem(inputs):
    stacked, x, y, valid = inputs
    one = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])
    params, metrics = align.fit_layers(stacked, x, y, valid, align.AlignSetup(MC, GDN, CFG, one))
    return stacked, x, y, valid, params, metrics


# The groups of docs/method.md §5, stated here independently of the mixer registry.
FROZEN = ("o_proj", "o_norm")
SLOW = ("q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv")


def _reference_optimizer(cfg, train):
    labels = {
        k: jax.tree.map(lambda _, k=k: "slow" if k in SLOW else "fast", v) for k, v in train.items()
    }
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.multi_transform(
            {
                "slow": optax.adamw(cfg.lr_qkv, weight_decay=cfg.weight_decay),
                "fast": optax.adamw(cfg.lr_gates, weight_decay=cfg.weight_decay),
            },
            labels,
        ),
    )


@jax.jit
def _reference_step(train, opt_state, frozen, x_ntd, y_ntd, valid_nt):
    """One AdamW update of one layer's trainable params; the loss is taken before it."""

    def loss_of(tr):
        p = {**tr, **frozen}
        return align.layer_loss(p, x_ntd, y_ntd, valid_nt, model_config=MC, mixer=GDN)

    tx = _reference_optimizer(CFG, train)
    loss, grads = jax.value_and_grad(loss_of)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss


def _fit_one_layer_reference(gdn_params, x_ntd, y_ntd, valid_nt):
    """Phase 2 of one layer as docs/method.md §5 states it, in a plain Python loop: its own AdamW
    over the trainable params, global-norm clipping, frozen o_proj/o_norm, the best of the
    losses before every update and after the last. Returns (best params, loss before, best
    loss, curve)."""
    frozen = {k: v for k, v in gdn_params.items() if k in FROZEN}
    train = {k: v for k, v in gdn_params.items() if k not in FROZEN}
    opt_state, curve = _reference_optimizer(CFG, train).init(train), []
    best, best_loss = train, np.inf
    for _ in range(CFG.steps + 1):  # the last pass only scores the final params
        new, opt_state, loss = _reference_step(train, opt_state, frozen, x_ntd, y_ntd, valid_nt)
        curve.append(float(loss))
        if loss < best_loss:
            best, best_loss = train, float(loss)
        train = new
    return {**best, **frozen}, curve[0], best_loss, np.asarray(curve[:-1])


def test_layer_loss_is_the_mean_squared_error_over_valid_tokens(inputs):
    """The loss every other test here compares with itself, against the docstring's formula in
    float64: sum over valid (n, t) of ||GDN(x)_nt - y_nt||^2 / (#valid * D). Sequence 0's 5
    padded tokens carry a GDN output unlike y, so a loss over all tokens differs (by ~6%)."""
    stacked, x, y, valid = inputs
    m = np.asarray(valid)
    assert 0 < m.sum() < m.size
    for layer in range(3):
        p = jax.tree.map(lambda a, layer=layer: a[layer], stacked)
        out, _, _ = GDN.module(MC).apply({"params": p}, x[layer], valid_bt=valid)
        err = np.asarray(out, np.float64) - np.asarray(y[layer], np.float64)  # [N, T, D]
        want = np.mean(err[m] ** 2)  # mean over the valid tokens' N_valid x D entries
        got = align.layer_loss(p, x[layer], y[layer], valid, model_config=MC, mixer=GDN)
        np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 sums of ~700 terms


def test_equals_a_separate_optax_loop_per_layer(problem):
    stacked, x, y, valid, params, metrics = problem
    for layer in range(3):
        one = jax.tree.map(lambda a, layer=layer: a[layer], stacked)
        best, before, after, curve = _fit_one_layer_reference(one, x[layer], y[layer], valid)
        np.testing.assert_allclose(metrics["loss_before"][layer], before, rtol=1e-6)
        np.testing.assert_allclose(metrics["loss_after"][layer], after, rtol=1e-5)
        np.testing.assert_allclose(metrics["curve"][layer], curve, rtol=1e-5)
        got = jax.tree.map(lambda a, layer=layer: a[layer], params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(best), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b)))


def test_loss_decreases_and_best_is_kept(problem):
    stacked, x, y, valid, params, metrics = problem
    before, after, curve = (np.asarray(metrics[k]) for k in ("loss_before", "loss_after", "curve"))
    assert np.all(after < 0.8 * before)
    np.testing.assert_allclose(curve[:, 0], before)
    assert np.all(after <= curve.min(axis=1) + 1e-7)
    # the returned params really have the reported loss
    for layer in range(3):
        p = jax.tree.map(lambda a, layer=layer: a[layer], params)
        loss = align.layer_loss(p, x[layer], y[layer], valid, model_config=MC, mixer=GDN)
        np.testing.assert_allclose(loss, after[layer], rtol=1e-4)
    # frozen parts did not move
    labels = GDN.spec.param_groups(stacked)
    frozen = [k for k in stacked if set(jax.tree.leaves(labels[k])) == {"frozen"}]
    assert frozen == ["o_norm", "o_proj"]
    for name in frozen:
        jax.tree.map(np.testing.assert_array_equal, params[name], stacked[name])


def test_sharded_over_layers_and_data_equals_single_device(problem):
    assert len(jax.devices()) == 8, "conftest fakes 8 CPU devices"
    stacked, x, y, valid, params, metrics = problem
    mesh = sharding.make_mesh({"layers": 4, "data": 2})  # 3 layers padded to 4
    params8, metrics8 = align.fit_layers(stacked, x, y, valid, align.AlignSetup(MC, GDN, CFG, mesh))
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)
    np.testing.assert_allclose(metrics8["loss_after"], metrics["loss_after"], rtol=1e-4)
    # layers only (shard_map path): 3 layers padded to 8 devices; the logged loss and
    # gradient norm are those of the 3 layers, whatever the padding
    layers_only = sharding.make_mesh({"layers": 8, "data": 1})
    logged = {}
    for name, mesh in (("one", sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])),
                       ("eight", layers_only)):  # fmt: skip
        params_l, metrics_l = align.fit_layers(
            stacked, x, y, valid, align.AlignSetup(MC, GDN, CFG, mesh),
            log_fn=lambda step, values, name=name: logged.setdefault(name, values),
        )  # fmt: skip
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(logged["eight"][key], logged["one"][key], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_l), jax.tree.leaves(params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)
    np.testing.assert_allclose(metrics_l["loss_after"], metrics["loss_after"], rtol=1e-4)


def test_zero_steps_returns_input_and_bad_split_is_rejected(problem):
    stacked, x, y, valid, _, _ = problem
    cfg0 = dataclasses.replace(CFG, steps=0, weight_decay=0.0)
    one = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])
    p, m = align.fit_layers(stacked, x, y, valid, align.AlignSetup(MC, GDN, cfg0, one))
    jax.tree.map(np.testing.assert_array_equal, p, stacked)
    np.testing.assert_allclose(m["loss_before"], m["loss_after"])
    with pytest.raises(ValueError, match="data"):
        align.fit_layers(
            stacked,
            x[:, :3],
            y[:, :3],
            valid[:3],
            align.AlignSetup(MC, GDN, CFG, sharding.make_mesh({"layers": 4, "data": 2})),
        )


def test_interrupted_then_resumed_fit_is_bit_identical(problem, tmp_path):
    """Checkpoints every 4 steps (12 steps + the scoring step: calls end at 4, 8, 12, 13); a
    crash after 6 steps resumes from step 4 and ends exactly where an uninterrupted run with
    the same checkpoints ends, best params, best loss and curve included."""
    stacked, x, y, valid, params, metrics = problem
    cfg = dataclasses.replace(CFG, checkpoint_every=4)
    one = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])
    fit = functools.partial(
        align.fit_layers, stacked, x, y, valid, align.AlignSetup(MC, GDN, cfg, one)
    )
    full = fit(checkpoint_dir=str(tmp_path / "full"))
    assert sorted(os.listdir(tmp_path / "full")) == ["12", "13"]  # the last two are kept
    crashed = str(tmp_path / "crashed")
    assert fit(checkpoint_dir=crashed, stop_after_steps=6) is None
    events = []
    resumed = fit(checkpoint_dir=crashed, log_fn=lambda step, values: events.append(values))
    assert events[0] == {"resumed_from_step": 4}
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    # Cutting the calls at checkpoints changes the result by float rounding at most.
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves((params, metrics)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
