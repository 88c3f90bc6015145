"""Phase-2 alignment: vmapped over layers, sharded over 8 simulated devices == one device."""

import jax
import jax.numpy as jnp
import numpy as np
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
CFG = align.AlignConfig(steps=12, lr_qkv=1e-3, lr_gates=1e-2, weight_decay=0.01, clip_norm=1.0)


@pytest.fixture(scope="module")
def problem():
    n_layers, n, t = 3, 4, 16
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n_layers, n, t, MC.hidden_size))
    y = 0.1 * jax.random.normal(ky, (n_layers, n, t, MC.hidden_size))
    trees = [
        GDN.module(MC).init(jax.random.PRNGKey(10 + i), x[0])["params"] for i in range(n_layers)
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    valid = jnp.ones((n, t), bool).at[0, :5].set(False)
    one = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])
    params, metrics = align.fit_layers(
        stacked, x, y, valid, model_config=MC, mixer=GDN, cfg=CFG, mesh=one
    )
    return stacked, x, y, valid, params, metrics


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
    params8, metrics8 = align.fit_layers(
        stacked, x, y, valid, model_config=MC, mixer=GDN, cfg=CFG, mesh=mesh
    )
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)
    np.testing.assert_allclose(metrics8["loss_after"], metrics["loss_after"], rtol=1e-4)
    # layers only (shard_map path): 3 layers padded to 8 devices
    params_l, metrics_l = align.fit_layers(
        stacked,
        x,
        y,
        valid,
        model_config=MC,
        mixer=GDN,
        cfg=CFG,
        mesh=sharding.make_mesh({"layers": 8, "data": 1}),
    )
    for a, b in zip(jax.tree.leaves(params_l), jax.tree.leaves(params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)
    np.testing.assert_allclose(metrics_l["loss_after"], metrics["loss_after"], rtol=1e-4)


def test_zero_steps_returns_input_and_bad_split_is_rejected(problem):
    stacked, x, y, valid, _, _ = problem
    cfg0 = align.AlignConfig(steps=0, lr_qkv=1e-3, lr_gates=1e-2, weight_decay=0.0, clip_norm=1.0)
    one = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])
    p, m = align.fit_layers(stacked, x, y, valid, model_config=MC, mixer=GDN, cfg=cfg0, mesh=one)
    jax.tree.map(np.testing.assert_array_equal, p, stacked)
    np.testing.assert_allclose(m["loss_before"], m["loss_after"])
    with pytest.raises(ValueError, match="data"):
        align.fit_layers(
            stacked,
            x[:, :3],
            y[:, :3],
            valid[:3],
            model_config=MC,
            mixer=GDN,
            cfg=CFG,
            mesh=sharding.make_mesh({"layers": 4, "data": 2}),
        )
