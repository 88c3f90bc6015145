"""Perplexity: known answers (uniform logits -> ppl = V), masking, batching, unigram baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.teacher import Transformer, init_params

V = 61


def _model(tied=False):
    cfg = tiny_model_config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return Transformer(cfg), init_params(cfg, jax.random.PRNGKey(0))


def _tokens(n, t, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(n, t)).astype(np.int32)


def test_uniform_logits_give_vocab_size():
    model, params = _model()
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])  # logits == 0
    out = ppl_lib.perplexity(model, params, _tokens(5, 9), batch_size=2)
    assert abs(out["ppl"] - V) / V < 1e-5
    assert abs(out["nll"] - math.log(V)) < 1e-5
    assert out["tokens"] == 5 * 8


def _manual(model, params, seq, valid):
    logits, _, _ = model.apply({"params": params}, jnp.asarray(seq), valid_bt=jnp.asarray(valid))
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    total, count = 0.0, 0
    for n in range(seq.shape[0]):
        for t in range(seq.shape[1] - 1):
            if valid[n, t] and valid[n, t + 1]:
                total -= logp[n, t, seq[n, t + 1]]
                count += 1
    return total / count, count


def test_masking_and_partial_last_batch_match_manual_sum():
    model, params = _model(tied=True)
    seq = _tokens(5, 12, seed=1)
    valid = np.ones_like(seq, bool)
    valid[1, :3] = False  # left padding
    valid[3, 7:] = False  # right padding
    nll, count = _manual(model, params, seq, valid)
    for batch_size in (2, 5):  # 2 leaves a partial last batch (2 + 2 + 1)
        out = ppl_lib.perplexity(model, params, seq, batch_size=batch_size, valid_nt=valid)
        assert out["tokens"] == count == 5 * 11 - 3 - 5
        assert abs(out["nll"] - nll) / nll < 1e-5, batch_size
        assert abs(out["ppl"] - math.exp(nll)) / math.exp(nll) < 1e-5
    # Changing a masked-out token changes nothing.
    seq2 = seq.copy()
    seq2[3, 9] = (seq2[3, 9] + 1) % V
    out2 = ppl_lib.perplexity(model, params, seq2, batch_size=2, valid_nt=valid)
    assert abs(out2["nll"] - nll) / nll < 1e-5


def test_perplexity_errors():
    model, params = _model()
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        ppl_lib.perplexity(model, params, np.zeros((4,), np.int32), batch_size=2)
    with pytest.raises(ValueError, match="token ids"):
        ppl_lib.perplexity(model, params, np.full((1, 4), V, np.int32), batch_size=2)
    with pytest.raises(ValueError, match="masked"):  # same shapes as above: no new compile
        ppl_lib.perplexity(
            model, params, _tokens(2, 9), batch_size=2, valid_nt=np.zeros((2, 9), bool)
        )


def test_unigram_add_one_smoothing():
    train = np.array([0, 0, 0, 1, 2, 2], np.int32)
    counts = ppl_lib.unigram_counts(train, 4)
    np.testing.assert_array_equal(counts, [3, 1, 2, 0])
    seq = np.array([[3, 0, 1, 3], [0, 2, 2, 2]], np.int32)  # predicted: 0,1,3 and 2,2,2
    valid = np.ones_like(seq, bool)
    valid[1, 3] = False  # drops the last 2 of row 1
    p = (counts + 1) / (6 + 4)
    expected = -np.mean(np.log([p[0], p[1], p[3], p[2], p[2]]))
    out = ppl_lib.unigram_perplexity(counts, seq, valid)
    assert out["tokens"] == 5 and abs(out["nll"] - expected) < 1e-12
    # The uniform-count limit: no training data -> ppl == vocab size.
    assert abs(ppl_lib.unigram_perplexity(np.zeros(7), seq)["ppl"] - 7) < 1e-9
