"""calibration.phase1_parts: phase 1 writes only the parts it is given (taylor.py).

On a tiny teacher with synthetic statistics: no parts = the `copy` init bit for bit; each part alone
changes exactly its own parameters; leaving one part out keeps exactly that part at `copy`.
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import select, stats, taylor
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.models.paths import layer_key, mixer_key
from taylorcal_jax.models.teacher import init_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import common  # noqa: E402  configs/common.py

CFG = tiny_model_config(num_hidden_layers=2)
MIXER = StudentMixer(GDNConfig.from_teacher(CFG), GDNRuntime(impl="chunked", chunk_size=8))
# the parameters of the GDN mixer each part writes (taylor.py module docstring)
WRITES = {
    "decay": {"A_log", "dt_bias", "a_proj/kernel"},
    "write_gate": {"b_proj/kernel"},
    "value_scale": {"v_proj/kernel"},
    "output_gate": {"g_proj/kernel"},
}


def consts(parts):
    c = common.get_config().calibration
    return taylor.TaylorConstants.from_config({**c, "phase1_parts": parts})


@pytest.fixture(scope="module")
def mixers():
    """mixers(strategy, parts) -> {(layer, param path): array}, computed once per argument."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    n_layers, heads, head_dim = CFG.num_hidden_layers, CFG.num_attention_heads, CFG.head_dim
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    st = stats.TeacherStats(  # synthetic statistics of the shapes the teacher pass gives
        distance_lh=jax.random.uniform(k[0], (n_layers, heads), minval=0.5, maxval=20.0),
        entropy_lh=jax.random.uniform(k[1], (n_layers, heads), minval=0.1, maxval=3.0),
        x_lntd=jax.random.normal(k[2], (n_layers, 2, 16, CFG.hidden_size)) + 0.5,
        context_lnthd=jax.random.normal(k[3], (n_layers, 2, 16, heads, head_dim)),
        attn_out_lntd=None,
        valid_nt=jnp.ones((2, 16), bool),
        layers=tuple(range(n_layers)),
    )

    @functools.cache
    def run(strategy, parts=taylor.PHASE1_PARTS):
        ctx = select.CalibrationContext(
            CFG, MIXER, consts(parts), align_cfg=None, mesh=None, seed=0
        )
        student, _ = select.initial_student(strategy, params, st, ctx)
        flat = {}
        for i in range(CFG.num_hidden_layers):
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                student[layer_key(i)][mixer_key(MIXER.name)]
            ):
                flat[(i, "/".join(k.key for k in path))] = np.asarray(leaf)
        return flat

    return run


def changed(a, b):
    """Parameter paths that differ between two mixers() results, in any layer."""
    assert a.keys() == b.keys()
    return {path for (layer, path) in a if not np.array_equal(a[layer, path], b[layer, path])}


def test_no_parts_is_the_copy_init(mixers):
    copy = mixers("copy")
    assert changed(mixers("taylor_init", ()), copy) == set()
    # and the full method does change every part
    full = mixers("taylor_init")
    assert changed(full, copy) == set().union(*WRITES.values())


@pytest.mark.parametrize("part", taylor.PHASE1_PARTS)
def test_each_part_changes_only_its_parameters(mixers, part):
    copy = mixers("copy")
    assert changed(mixers("taylor_init", (part,)), copy) == WRITES[part]
    others = tuple(p for p in taylor.PHASE1_PARTS if p != part)
    all_but = mixers("taylor_init", others)
    assert changed(all_but, copy) == set().union(*(WRITES[p] for p in others))
    full = mixers("taylor_init")
    # decay and the write gate do not depend on any other part: their values equal the full run's
    for p in {"decay", "write_gate"} - {part}:
        for name in WRITES[p]:
            for i in range(CFG.num_hidden_layers):
                np.testing.assert_array_equal(all_but[(i, name)], full[(i, name)])


def test_published_strategy_writes_all_parts_whatever_the_config(mixers):
    assert common.get_config().calibration.phase1_parts == ("output_gate",)
    published = select.phase1_constants("taylor_calibrate_published", consts(("output_gate",)))
    assert published.phase1_parts == taylor.PHASE1_PARTS
    assert select.phase1_constants("taylor_calibrate", consts(("decay",))).phase1_parts == (
        "decay",
    )
    assert not select.configurable_phase1("taylor_calibrate_published")
    assert select.configurable_phase1("taylor_init")
    # the published strategy's phase 1 is the full method's, bit for bit
    ours = mixers("taylor_calibrate_published", ("output_gate",))
    full = mixers("taylor_init")
    assert changed(ours, full) == set()


def test_parts_are_validated_and_ordered():
    assert consts(("output_gate", "decay")).phase1_parts == ("decay", "output_gate")
    default = consts(taylor.PHASE1_PARTS)
    assert (
        dataclasses.replace(default, phase1_parts=tuple(reversed(taylor.PHASE1_PARTS))) == default
    )
    for bad in (("decay", "decay"), ("sigma",), "decay"):
        with pytest.raises(ValueError, match="calibration.phase1_parts"):
            consts(bad)


def test_pipeline_validation_rejects_unknown_parts(tmp_path):
    import tiny  # noqa: PLC0415  configs/tiny.py

    from taylorcal_jax import main
    from taylorcal_jax.errors import ConfigError
    from taylorcal_jax.run import validate

    config = tiny.get_config("smoke")
    config.calibration.phase1_parts = ("decay", "beta")
    with pytest.raises(ConfigError, match="phase1_parts"):
        validate.validate(config, main.STAGES, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
