"""Statistics and evaluation are data parallel over the run's mesh: on the 8 fake CPU devices
their results equal the single-device ones (float32 summation order aside: rtol 1e-5)."""

import jax
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import pipeline
from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.run import fields
from taylorcal_jax.utils import sharding

MESHES = [{"layers": -1, "data": 1}, {"layers": 2, "data": -1}, {"layers": 1, "data": 8}]


@pytest.fixture(scope="module")
def teacher():
    cfg = tiny_model_config(vocab_size=61, max_position_embeddings=64)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _tokens(n, t, seed=0):
    return np.random.default_rng(seed).integers(0, 61, size=(n, t)).astype(np.int32)


@pytest.mark.parametrize("axes", MESHES, ids=str)
def test_perplexity_over_the_mesh_equals_one_device(teacher, axes):
    cfg, params = teacher
    seq = _tokens(11, 12, seed=2)
    valid = np.ones(seq.shape, bool)
    valid[3, :4] = False  # padding inside a batch
    one = ppl_lib.perplexity(Transformer(cfg), params, seq, batch_size=3, valid_nt=valid)
    mesh = sharding.make_mesh(axes)
    out = ppl_lib.perplexity(Transformer(cfg), params, seq, batch_size=3, valid_nt=valid, mesh=mesh)
    assert out["tokens"] == one["tokens"] == 11 * 11 - 4
    np.testing.assert_allclose(out["nll"], one["nll"], rtol=1e-6)


def test_statistics_over_the_mesh_equal_one_device(teacher):
    cfg, params = teacher
    tokens = _tokens(8, 16, seed=3)
    valid = np.ones(tokens.shape, bool)
    valid[5, :6] = False
    one = stats_lib.collect(Transformer(cfg), params, cfg, tokens, valid_nt=valid, block_size=8)
    mesh = sharding.make_mesh({"layers": 2, "data": -1})
    out = stats_lib.collect(
        Transformer(cfg), params, cfg, tokens, valid_nt=valid, block_size=8, mesh=mesh
    )
    for name in ("distance_lh", "entropy_lh", "x_lntd", "context_lnthd", "attn_out_lntd"):
        np.testing.assert_allclose(getattr(out, name), getattr(one, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not split over the 8 devices"):
        stats_lib.collect(Transformer(cfg), params, cfg, tokens[:6], mesh=mesh)


@pytest.mark.parametrize("n,per_device", [(5, 1), (3, 4)])
def test_statistics_stage_chunks_and_merges_like_one_pass(teacher, n, per_device):
    """pipeline.collect_stats pads the last chunk with invalid rows and merges chunk means
    weighted by their valid queries: the same as one collect over all sequences."""
    cfg, params = teacher
    config = fields.defaults()
    config.calibration.block_size = 8
    config.calibration.sequences_per_batch = per_device
    tokens = _tokens(n, 16, seed=4)
    one = stats_lib.collect(Transformer(cfg), params, cfg, tokens, block_size=8)
    mesh = sharding.make_mesh({"layers": 1, "data": 2}, jax.devices()[:2])
    out = pipeline.collect_stats(config, cfg, params, tokens, mesh=mesh)
    assert out.x_lntd.shape == one.x_lntd.shape and out.layers == one.layers
    for name in ("distance_lh", "entropy_lh", "x_lntd", "context_lnthd", "attn_out_lntd"):
        np.testing.assert_allclose(getattr(out, name), getattr(one, name), rtol=1e-5, atol=1e-6)
