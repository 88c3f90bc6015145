"""Every stage on the one (layers, data, fsdp) mesh: on 8 fake CPU devices, a (layers 2, data 2,
fsdp 2) mesh with the params split over "fsdp" gives the single-device results (float32
summation order aside: rtol 1e-5 unless stated), and the per-device memory of a compiled
training step falls as the fsdp axis grows."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config
from tiny_pretraining import tiny_pretraining

from taylorcal_jax import main as main_lib
from taylorcal_jax.calibrate import select
from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.convert.naive import copy_init
from taylorcal_jax.errors import ConfigError
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.run import fields
from taylorcal_jax.run.context import build_mesh
from taylorcal_jax.train import loop
from taylorcal_jax.train import pretrain as pretrain_lib
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

MESH_222 = {"layers": 2, "data": 2, "fsdp": 2}
CFG = tiny_model_config(vocab_size=64, max_position_embeddings=64)


def _tokens(n, t, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)


def _is_fsdp_sharded(x) -> bool:
    return sharding.FSDP in jax.tree.leaves(tuple(x.sharding.spec))


@pytest.fixture(scope="module")
def teacher():
    return init_params(CFG, jax.random.PRNGKey(0))


# --------------------------------------------------------------------------- the spec rule


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert sharding.fsdp_spec((64, 32), 2) == P("fsdp")
    assert sharding.fsdp_spec((32, 64), 2) == P(None, "fsdp")
    assert sharding.fsdp_spec((6, 8), 4) == P(None, "fsdp")  # 6 does not divide by 4
    assert sharding.fsdp_spec((8, 8), 4) == P("fsdp")  # ties: the first axis
    assert sharding.fsdp_spec((3, 5), 2) == P()  # nothing divides: replicated
    assert sharding.fsdp_spec((), 2) == P()  # scalars (Adam's count) replicated
    assert sharding.fsdp_spec((64, 32), 1) == P()  # no fsdp axis


def test_run_mesh_has_three_axes_and_places_the_teacher_sharded(teacher):
    config = fields.defaults()
    config.mesh.update(layers=2, data=2, fsdp=2)
    mesh = build_mesh(config.mesh)
    assert dict(mesh.shape) == {"layers": 2, "data": 2, "fsdp": 2}
    placed = sharding.place_params(teacher, mesh)
    leaves = jax.tree.leaves(placed)
    assert all(_is_fsdp_sharded(x) for x in leaves if max(x.shape) % 2 == 0)
    embed = placed["embed_tokens"]["embedding"]  # [64, 32]: the vocab axis split in two
    assert embed.addressable_shards[0].data.shape == (32, 32)
    for got, want in zip(leaves, jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    config.mesh.update(layers=-1, data=1, fsdp=1)  # the default: all devices on "layers"
    assert dict(build_mesh(config.mesh).shape) == {"layers": 8, "data": 1, "fsdp": 1}


def test_mesh_section_is_checked_before_any_work(tmp_path):
    """mesh.fsdp joins the device-count check, and pretraining batches must split over
    data x fsdp: one-line ConfigErrors, nothing written."""
    for changes, match in [
        ({"fsdp": 3}, "mesh.fsdp=3 do not fit the 8 devices here"),
        ({"fsdp": 0}, "mesh.fsdp must be positive or -1"),
        ({"data": 2, "fsdp": 4, "layers": 1}, r"pretrain.batch_size=4 does not split over "),
    ]:
        config = tiny.get_config("smoke")
        config.mesh.update(changes)
        with pytest.raises(ConfigError, match=match):
            main_lib.run(config, str(tmp_path / "wd"))
        assert not (tmp_path / "wd").exists()


def test_gather_params_inside_shard_map_gives_the_whole_leaf():
    mesh = sharding.make_mesh(MESH_222)
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    specs = {"w": P("fsdp"), "b": P(None, ("data", "fsdp"))}
    tree = {"w": x, "b": x[:4, :4]}
    placed = {k: jax.device_put(v, sharding.named(mesh, *specs[k])) for k, v in tree.items()}
    whole = jax.shard_map(
        lambda t: sharding.gather_params(t, specs),
        mesh=mesh,
        in_specs=(specs,),
        out_specs={"w": P(), "b": P()},
        check_vma=False,
    )(placed)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(whole[k]), np.asarray(tree[k]))


# -------------------------------------------------------------- stages equal one device


def test_perplexity_with_fsdp_params_equals_one_device(teacher):
    seq = _tokens(11, 12, seed=2)
    valid = np.ones(seq.shape, bool)
    valid[3, :4] = False
    one = ppl_lib.perplexity(Transformer(CFG), teacher, seq, batch_size=3, valid_nt=valid)
    mesh = sharding.make_mesh(MESH_222)
    placed = sharding.place_params(teacher, mesh)
    out = ppl_lib.perplexity(Transformer(CFG), placed, seq, batch_size=3, valid_nt=valid, mesh=mesh)
    assert out["tokens"] == one["tokens"] == 11 * 11 - 4
    np.testing.assert_allclose(out["nll"], one["nll"], rtol=1e-6)


def test_statistics_with_fsdp_params_equal_one_device(teacher):
    tokens = _tokens(8, 16, seed=3)
    valid = np.ones(tokens.shape, bool)
    valid[5, :6] = False
    kw = dict(valid_nt=valid, block_size=8)
    one = stats_lib.collect(Transformer(CFG), teacher, CFG, tokens, **kw)
    mesh = sharding.make_mesh(MESH_222)
    placed = sharding.place_params(teacher, mesh)
    out = stats_lib.collect(Transformer(CFG), placed, CFG, tokens, mesh=mesh, **kw)
    for name in ("distance_lh", "entropy_lh", "x_lntd", "context_lnthd", "attn_out_lntd"):
        np.testing.assert_allclose(getattr(out, name), getattr(one, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["ar", "ga_s2"])
def test_layer_scores_over_the_mesh_equal_one_device(teacher, policy):
    """Candidate perplexities of both scored policies, rows split over all 8 devices and the
    union params over "fsdp", against unsharded scoring (rtol 1e-5)."""
    runtime = GDNRuntime(impl="chunked", chunk_size=8)
    sc_all = StudentConfig.from_teacher(CFG, (), mixer="gdn")
    mixers = select.mixers_of(copy_init(teacher, sc_all, jax.random.PRNGKey(1)), "gdn", 2)
    mixer = sc_all.student_mixer(runtime)
    seqs = _tokens(5, 12, seed=4)  # 5 rows: the one batch is padded to 8
    scoring = select.LayerScoring(CFG, mixer, teacher, mixers, seqs, batch_size=3, parallel=2)
    one = select.policy_scores(policy, scoring)
    mesh = sharding.make_mesh(MESH_222)
    out = select.policy_scores(policy, dataclasses.replace(scoring, mesh=mesh))
    assert out.shape == (2,) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, one, rtol=1e-5)


def _pretrain_setup():
    cfg = tiny_model_config(
        vocab_size=32, hidden_size=16, intermediate_size=32, max_position_embeddings=32
    )
    return tiny_pretraining(
        cfg, cycles=40, steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2
    )


def test_pretraining_on_the_mesh_equals_one_device(tmp_path):
    """Four AdamW steps with each batch split over data x fsdp = 4 devices and params and
    moments split over fsdp: the same params as on one device (max error relative to each
    leaf's largest entry <= 1e-5), stored sharded."""
    model, params, stream, opts = _pretrain_setup()
    one = pretrain_lib.pretrain(model, params, stream, opts, str(tmp_path / "one"))
    mesh = sharding.make_mesh(MESH_222)
    out = pretrain_lib.pretrain(model, params, stream, opts, str(tmp_path / "m"), mesh=mesh)
    assert _is_fsdp_sharded(out["params"]["embed_tokens"]["embedding"])
    moments = [x for x in jax.tree.leaves(out["opt_state"]) if x.ndim]  # AdamW's mu and nu
    assert len(moments) == 2 * len(jax.tree.leaves(params))
    assert all(map(_is_fsdp_sharded, moments))  # every tiny-model axis size here is even
    for got, want in zip(
        jax.tree.leaves(out["params"]), jax.tree.leaves(one["params"]), strict=True
    ):
        got, want = np.asarray(got), np.asarray(want)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="batch_size 8 does not split over the 16"):
        pretrain_lib.pretrain(
            model,
            params,
            stream,
            opts,
            str(tmp_path / "bad"),
            mesh=sharding.make_mesh({"data": 8, "fsdp": 2}, jax.devices() * 2),
        )


def _compiled_step_memory(fsdp: int):
    """(argument, temp) bytes per device of one compiled pretraining step on a 4-device
    (data 4 / fsdp, fsdp) mesh."""
    cfg = tiny_model_config(
        vocab_size=512, hidden_size=128, intermediate_size=256, max_position_embeddings=32
    )
    model = Transformer(cfg)
    _, _, _, opts = _pretrain_setup()
    mesh = sharding.make_mesh({"data": 4 // fsdp, "fsdp": fsdp}, jax.devices()[:4])
    task = pretrain_lib.make_task(model, opts, mesh)
    state = jax.eval_shape(
        lambda: loop.init_state(
            task, init_params(cfg, jax.random.PRNGKey(0)), rng=jax.random.PRNGKey(0)
        )
    )
    batch = jax.ShapeDtypeStruct((8, 12), jnp.int32)
    stats = loop.compiled_step(task, state, batch, mesh=mesh).memory_analysis()
    return stats.argument_size_in_bytes, stats.temp_size_in_bytes


def test_compiled_step_memory_falls_as_fsdp_grows():
    """Per-device argument bytes (params, AdamW moments, batch) of a training step with
    ~0.4M params: each doubling of fsdp at least 0.6x (ideal 0.5x; the batch shard and
    indivisible leaves stay), and arguments plus temporaries fall too."""
    mem = {f: _compiled_step_memory(f) for f in (1, 2, 4)}
    assert mem[2][0] <= 0.6 * mem[1][0] and mem[4][0] <= 0.6 * mem[2][0], mem
    assert sum(mem[4]) < sum(mem[2]) < sum(mem[1]), mem
