"""Forward passes with the params split over an fsdp=8 mesh gather them one module at a time
(`Transformer.param_layout`): logits and gradients equal one device's (max error relative to
each array's largest entry <= 1e-5: float32 summation order), and the compiled per-device
temporaries hold one layer's whole params, not the whole model.

XLA's CPU pipeline removes optimisation barriers before it schedules (the GPU pipeline only
after), and the CPU scheduler then starts every all-gather at the top of the program whatever
the code's order. The memory tests therefore compile with that pass off
(`xla_disable_hlo_passes=cse_barrier_expander`): the program is scheduled with its barriers in
force, as on a GPU. A whole-tree gather compiled the same way is the contrast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.train import distill
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P

BARRIERS_KEPT = {"xla_disable_hlo_passes": "cse_barrier_expander"}
# Eight equal layers, each ~7x the embedding (and the untied head): a layer is ~1/8 of the model.
MEM_CFG = tiny_model_config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=8,
    max_position_embeddings=64,
)


def _tokens(n, t, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _fsdp8():
    return sharding.make_mesh({"fsdp": 8})


def test_layout_gathers_a_subtree_and_is_hashable():
    mesh = _fsdp8()
    tree = {"a": {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.arange(3.0)}, "c": jnp.ones(8)}
    specs = sharding.param_specs(tree, mesh)
    layout = sharding.ParamLayout.of(specs)
    assert hash(layout) == hash(sharding.ParamLayout.of(specs))  # a static field of jit'd models
    placed = sharding.place_params(tree, mesh)
    whole = jax.shard_map(
        lambda t: layout.gather(("a",), t["a"], after=t["c"]),
        mesh=mesh,
        in_specs=(specs,),
        out_specs={"w": P(), "b": P()},
        check_vma=False,
    )(placed)
    for k in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(whole[k]), np.asarray(tree["a"][k]))


def test_init_with_a_layout_is_refused():
    model = Transformer(tiny_model_config(), param_layout=sharding.ParamLayout.of({}))
    with pytest.raises(ValueError, match="init the model without it"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("tied, remat", [(False, False), (True, True)])
def test_forward_and_gradient_in_shards_equal_one_device(tied, remat):
    """Logits and the gradient of a loss of them, params split 8 ways and gathered a module at a
    time inside shard_map, against the unsharded model: untied head, and tied head with remat
    (whose backward pass gathers each layer again)."""
    cfg = tiny_model_config(
        vocab_size=64, num_hidden_layers=3, tie_word_embeddings=tied, max_position_embeddings=64
    )
    model = Transformer(cfg, remat=remat)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = _tokens(8, 12, 64, seed=1)
    mesh = _fsdp8()
    specs = sharding.param_specs(params, mesh)
    rows = sharding.batch_spec(mesh)

    def sharded_logits(p, tok):
        return jax.shard_map(
            lambda p, tok: model.clone(param_layout=sharding.ParamLayout.of(specs)).apply(
                {"params": p}, tok
            )[0],
            mesh=mesh,
            in_specs=(specs, rows),
            out_specs=rows,
            check_vma=False,
        )(p, tok)

    def one_logits(p, tok):
        return model.apply({"params": p}, tok)[0]

    def loss(logits_fn):
        return jax.jit(jax.value_and_grad(lambda p, tok: jnp.mean(logits_fn(p, tok) ** 2)))

    placed = sharding.place_params(params, mesh)
    _assert_close(jax.jit(sharded_logits)(placed, tokens), one_logits(params, tokens))
    value, grads = loss(sharded_logits)(placed, tokens)
    value_one, grads_one = loss(one_logits)(params, tokens)
    _assert_close(value, value_one)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_one), strict=True):
        _assert_close(got, want)


def _temp_bytes(fn, *args) -> int:
    compiled = fn.lower(*args).compile(compiler_options=BARRIERS_KEPT)
    return compiled.memory_analysis().temp_size_in_bytes


def _forward_temp(kind: str, axes) -> int:
    """Per-device temporaries of a compiled teacher forward over 8 rows on a mesh of `axes`:
    "perplexity" (the Transformer), "statistics" (the blockwise teacher pass), or "whole"
    (the Transformer after a gather of the whole tree, the contrast)."""
    model = Transformer(MEM_CFG)
    params = init_params(MEM_CFG, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(axes)
    placed = sharding.place_params(params, mesh)
    rows_sharding = sharding.batch_sharding(mesh)
    tok = jax.device_put(_tokens(8, 16, MEM_CFG.vocab_size), rows_sharding)
    val = jax.device_put(np.ones(tok.shape, bool), rows_sharding)
    if kind == "perplexity":
        return _temp_bytes(ppl_lib._batch_fn(model, mesh), placed, tok, val)
    if kind == "statistics":
        layers = tuple(range(MEM_CFG.num_hidden_layers))
        fn = stats_lib._collect_jit(model, MEM_CFG, layers, 8, False, 1, "blockwise", mesh)
        return _temp_bytes(fn, placed, tok, val)
    specs = sharding.param_specs(params, mesh)
    rows = sharding.batch_spec(mesh)
    whole = jax.jit(
        jax.shard_map(
            lambda p, t: model.apply({"params": sharding.gather_params(p, specs)}, t)[0],
            mesh=mesh,
            in_specs=(specs, rows),
            out_specs=rows,
            check_vma=False,
        )
    )
    return _temp_bytes(whole, placed, tok)


@pytest.mark.parametrize("kind", ["perplexity", "statistics"])
def test_compiled_forward_holds_one_layer_whole(kind):
    """fsdp=8 temporaries minus those of the same program with replicated params (data=8: the
    activations) stay below two layers' whole params (one layer, its transposing copies, the
    embedding or head) and below a quarter of the model; gathering the whole tree holds at
    least the whole model."""
    params = init_params(MEM_CFG, jax.random.PRNGKey(0))
    model_bytes, layer_bytes = _nbytes(params), _nbytes(params["layers_0"])
    activations = _forward_temp(kind, {"data": 8})
    temp = _forward_temp(kind, {"fsdp": 8})
    assert temp - activations < 2 * layer_bytes, (temp, activations, layer_bytes)
    assert temp < model_bytes / 4, (temp, model_bytes)
    if kind == "perplexity":
        assert _forward_temp("whole", {"fsdp": 8}) > model_bytes


def test_compiled_distillation_step_with_remat_holds_few_layers_whole():
    """Loss and gradient of stage 2 (student with remat, teacher, both split 8 ways): the
    temporaries stay below half of one model's params, where gathering both trees whole would
    need both models."""
    params = init_params(MEM_CFG, jax.random.PRNGKey(0))
    mesh = _fsdp8()
    cfg = distill.KLDistillConfig(
        lr_mixer=1e-3, lr_rest=1e-3, warmup_steps=0, weight_decay=0.0, clip_norm=1.0, chunk_size=8
    )
    student, teacher = Transformer(MEM_CFG, remat=True), Transformer(MEM_CFG)
    task = distill.make_task(student, teacher, "gdn", cfg, mesh, sharding.param_spec(mesh))
    placed = sharding.place_params(params, mesh)
    tok = jax.device_put(_tokens(8, 16, MEM_CFG.vocab_size), sharding.batch_sharding(mesh))
    step = jax.jit(jax.value_and_grad(lambda p, tok, tp: task.loss_fn(p, tok, None, tp)[0]))
    temp = _temp_bytes(step, placed, tok, placed)
    assert temp < _nbytes(params) / 2, (temp, _nbytes(params))
