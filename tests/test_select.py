"""Strategies, layer policies and the parallel (vmapped) candidate scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import select
from taylorcal_jax.convert.naive import copy_init, zero_gate
from taylorcal_jax.eval.perplexity import perplexity
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import init_params

CFG = tiny_model_config(model_type="qwen2", vocab_size=48, num_hidden_layers=4)


@pytest.fixture(scope="module")
def tiny():
    teacher = init_params(CFG, jax.random.PRNGKey(0))
    sc_all = StudentConfig.from_teacher(CFG, (), impl="chunked", chunk_size=8)
    copy = copy_init(teacher, sc_all, jax.random.PRNGKey(1))
    mixers = {i: copy[f"layers_{i}"]["gdn"] for i in range(CFG.num_hidden_layers)}
    seqs = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, CFG.vocab_size))
    return teacher, sc_all.gdn, mixers, seqs


def test_uniform_matches_release_layout():
    assert select.uniform_layers(28, 0.25) == (0, 4, 8, 12, 16, 20, 24)
    assert select.uniform_layers(4, 0.25) == (0,)
    assert select.uniform_layers(36, 0.25) == tuple(range(0, 36, 4))
    with pytest.raises(ValueError, match="kept_fraction"):
        select.uniform_layers(4, 0.0)


def test_keep_from_scores_directions():
    scores = [5.0, 9.0, 1.0, 9.0]
    assert select.keep_from_scores("ar", scores, 0.5) == (1, 3)  # removal hurts most
    assert select.keep_from_scores("ga_s2", scores, 0.5) == (0, 2)  # best alone
    with pytest.raises(ValueError, match="policy"):
        select.check_policy("random")


def test_blended_model_equals_student_model(tiny):
    teacher, gdn, mixers, seqs = tiny
    keep = (1, 3)
    sc = StudentConfig(CFG, keep, gdn)
    student = select.assemble_student(teacher, mixers, keep, CFG.num_hidden_layers)
    want, _, _ = sc.model().apply({"params": student}, jnp.asarray(seqs))
    union = select.union_params(teacher, mixers, CFG.num_hidden_layers)
    valid = jnp.ones(seqs.shape, bool)
    got = select.blended_logits(
        CFG, gdn, union, jnp.asarray(select.keep_mask(keep, 4)), jnp.asarray(seqs), valid
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_parallel_scores_equal_one_model_at_a_time(tiny):
    teacher, gdn, mixers, seqs = tiny
    # AR: candidate l = teacher with layer l's attention removed (zero_gate on l only)
    ar = select.policy_scores(
        "ar", CFG, gdn, teacher, mixers, seqs, batch_size=2, parallel=3
    )  # 4 candidates in groups of 3: exercises the padded last group
    for layer in (1,):  # one real model per policy keeps the test fast
        keep = tuple(i for i in range(4) if i != layer)
        sc = StudentConfig(CFG, keep, gdn)
        p = zero_gate(teacher, sc, jax.random.PRNGKey(5))
        want = perplexity(sc.model(), p, seqs, batch_size=2)["ppl"]
        np.testing.assert_allclose(ar[layer], want, rtol=1e-5)
    # GA-S2: candidate l keeps only layer l, the given mixers elsewhere
    ga = select.policy_scores("ga_s2", CFG, gdn, teacher, mixers, seqs, batch_size=3, parallel=4)
    for layer in (2,):
        sc = StudentConfig(CFG, (layer,), gdn)
        p = select.assemble_student(teacher, mixers, (layer,), 4)
        want = perplexity(sc.model(), p, seqs, batch_size=3)["ppl"]
        np.testing.assert_allclose(ga[layer], want, rtol=1e-5)
    keep, scores = select.choose_layers(
        "ga_s2", 0.5, CFG, gdn, teacher, mixers, seqs, batch_size=3, parallel=4
    )
    np.testing.assert_allclose(scores, ga, rtol=1e-6)
    assert keep == tuple(sorted(np.argsort(ga, kind="stable")[:2].tolist()))
