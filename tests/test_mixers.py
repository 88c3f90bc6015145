"""The student-mixer registry: lookups, and the contract of models/mixers/spec.py checked for
every entry of MIXERS (a new mixer is tested here by being registered)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.models.mixers import (
    CONVERSIONS,
    MIXERS,
    PARAM_GROUPS,
    StudentMixer,
    get_mixer,
    mixer_for_config,
)
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.models.paths import ATTENTION, layer_mixer
from taylorcal_jax.models.teacher import init_params

CFG = tiny_model_config(model_type="qwen2", vocab_size=40, num_hidden_layers=1, attention_bias=True)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_lookups_and_errors():
    assert get_mixer("gdn") is MIXERS["gdn"]
    with pytest.raises(ValueError, match="unknown student mixer 'mamba2'; known: gdn"):
        get_mixer("mamba2")
    with pytest.raises(ValueError, match="not the architecture config of a student mixer"):
        mixer_for_config(CFG)
    arch = GDNConfig.from_teacher(CFG)
    assert mixer_for_config(arch) is MIXERS["gdn"]
    assert StudentMixer(arch).runtime == GDNRuntime()  # None: the entry's defaults
    with pytest.raises(ValueError, match="must be a GDNRuntime"):
        StudentMixer(arch, runtime={"impl": "chunked"})
    mixer = StudentMixer.from_options(
        "gdn", CFG, {"use_short_conv": True, "impl": "chunked", "chunk_size": 8}
    )
    assert mixer == StudentMixer(
        GDNConfig.from_teacher(CFG, use_short_conv=True), GDNRuntime(impl="chunked", chunk_size=8)
    )
    with pytest.raises(ValueError, match=r"unknown gdn options \['chunk'\]"):
        StudentMixer.from_options("gdn", CFG, {"chunk": 8})
    hash(mixer)  # a static argument of jit


@pytest.mark.parametrize("name", list(MIXERS))
def test_entry_contract(name):
    spec = get_mixer(name)
    assert spec.name == name and name != ATTENTION
    config = spec.config_class.from_teacher(CFG)
    saved = json.loads(json.dumps(config.to_dict()))
    assert spec.config_class.from_dict(saved) == config
    assert not set(saved) & set(spec.runtime_fields), "runtime options must not be saved"
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(spec.runtime_class))
    mixer = StudentMixer(config)

    # The module: called like attention; a cached prefill + single steps equal the full pass.
    module = mixer.module(CFG)
    b, t = 2, 6
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, CFG.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool)
    params = module.init(jax.random.PRNGKey(1), x, positions_bt=pos, valid_bt=valid)["params"]
    y, cache, _ = module.apply({"params": params}, x, positions_bt=pos, valid_bt=valid)
    assert y.shape == x.shape and cache is None
    cache = mixer.init_cache(CFG, b, jnp.float32)
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 6)):
        out, cache, _ = module.apply(
            {"params": params},
            x[:, lo:hi],
            positions_bt=pos[:, lo:hi],
            valid_bt=valid[:, lo:hi],
            cache=cache,
        )
        outs.append(out)
    assert _rel(jnp.concatenate(outs, axis=1), y) < 1e-5

    # Conversions from a teacher attention layer: the module's own layout and dtypes.
    attn = layer_mixer(init_params(CFG, jax.random.PRNGKey(2)), 0, ATTENTION)
    layout = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert set(spec.conversions) <= set(CONVERSIONS)
    for conv_name, conversion in spec.conversions.items():
        converted = conversion(attn, CFG, config, jax.random.PRNGKey(3))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), converted) == layout, conv_name
    if "zero_gate" in spec.conversions:  # the layer is removed: its output is exactly 0
        zero = spec.conversions["zero_gate"](attn, CFG, config, jax.random.PRNGKey(3))
        y0, _, _ = module.apply({"params": zero}, x, positions_bt=pos, valid_bt=valid)
        np.testing.assert_array_equal(np.asarray(y0), 0.0)

    # Parameter groups label every leaf; diagnostics are per-head vectors.
    labels = spec.param_groups(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert set(jax.tree.leaves(labels)) <= set(PARAM_GROUPS)
    diag = spec.diagnostics(params, x, valid)
    assert diag and all(np.ndim(v) == 1 and np.all(np.isfinite(v)) for v in diag.values())
