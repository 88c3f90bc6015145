"""Strategies, layer policies and the parallel (vmapped) candidate scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import select
from taylorcal_jax.convert.naive import copy_init, zero_gate
from taylorcal_jax.eval.perplexity import perplexity
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_cache, init_params

CFG = tiny_model_config(model_type="qwen2", vocab_size=48, num_hidden_layers=4)
RUNTIME = GDNRuntime(impl="chunked", chunk_size=8)


@pytest.fixture(scope="module")
def tiny():
    teacher = init_params(CFG, jax.random.PRNGKey(0))
    sc_all = StudentConfig.from_teacher(CFG, (), mixer="gdn")
    copy = copy_init(teacher, sc_all, jax.random.PRNGKey(1))
    mixers = select.mixers_of(copy, "gdn", CFG.num_hidden_layers)
    seqs = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, CFG.vocab_size))
    return teacher, sc_all.student_mixer(RUNTIME), mixers, seqs


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
    # a diverged candidate (NaN perplexity) is the worst one, not a break in the order
    diverged = [5.0, float("nan"), 1.0, 3.0]
    assert select.keep_from_scores("ga_s2", diverged, 0.5) == (2, 3)
    assert select.keep_from_scores("ar", diverged, 0.5) == (0, 1)
    with pytest.raises(ValueError, match="policy"):
        select.check_policy("random")


def test_keep_flags_give_teacher_student_and_every_mix(tiny):
    """The one Transformer with traced keep flags on a union tree: all True is the teacher,
    all False the fully converted student, a mix the assembled student of that keep set
    (logits at valid positions: relative L2 error <= 1e-5 and max abs error <= 1e-4, with a
    left-padded row); vmapped over masks too."""
    teacher, mixer, mixers, seqs = tiny
    n = CFG.num_hidden_layers
    union = select.union_params(teacher, mixers, mixer.name)
    model = Transformer(CFG, student_mixer=mixer)
    tokens = jnp.asarray(seqs)
    valid = jnp.ones(seqs.shape, bool).at[1, :4].set(False)
    apply = jax.jit(lambda p, m: model.apply({"params": p}, tokens, valid_bt=valid, keep_l=m)[0])
    ok = np.asarray(valid)

    def close(got, want):  # float32 rounding of differently fused programs over 4 layers
        a, b = np.asarray(got, np.float64)[ok], np.asarray(want, np.float64)[ok]
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
        assert np.abs(a - b).max() <= 1e-4

    want = {}
    for keep in ((0, 1, 2, 3), (), (1, 3)):
        sc = StudentConfig(CFG, keep, mixer.config)
        student = select.assemble_student(teacher, mixers, sc)
        want[keep], _, _ = sc.model(runtime=RUNTIME).apply(
            {"params": student}, tokens, valid_bt=valid
        )
        close(apply(union, select.keep_mask(keep, n)), want[keep])
    teacher_logits, _, _ = Transformer(CFG).apply({"params": teacher}, tokens, valid_bt=valid)
    close(want[(0, 1, 2, 3)], teacher_logits)  # all kept: the teacher itself
    assert np.abs(np.asarray(want[(1, 3)] - teacher_logits)[ok]).max() > 1e-3  # mixers matter
    masks = jnp.asarray(np.stack([select.keep_mask(k, n) for k in want]))
    batched = jax.jit(jax.vmap(lambda m: apply(union, m)))(masks)
    for got, keep in zip(batched, want, strict=True):
        close(got, want[keep])
    # Params made by init with keep flags have exactly the union layout.
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, keep_l=masks[0]))
    assert jax.tree.structure(init["params"]) == jax.tree.structure(union)
    with pytest.raises(ValueError, match="mixers=None"):
        StudentConfig(CFG, (1,), mixer.config).model().apply(
            {"params": union}, tokens, keep_l=masks[0]
        )
    with pytest.raises(ValueError, match="decoding cache"):
        model.apply({"params": union}, tokens, keep_l=masks[0], cache=init_cache(model, 3, 16))


def test_parallel_scores_equal_one_model_at_a_time(tiny):
    teacher, mixer, mixers, seqs = tiny
    # AR: candidate l = teacher with layer l's attention removed (zero_gate on l only)
    # 4 candidates in groups of 3: exercises the padded last group
    ar = select.policy_scores(
        "ar", select.LayerScoring(CFG, mixer, teacher, mixers, seqs, batch_size=2, parallel=3)
    )
    for layer in (1,):  # one real model per policy keeps the test fast
        keep = tuple(i for i in range(4) if i != layer)
        sc = StudentConfig(CFG, keep, mixer.config)
        p = zero_gate(teacher, sc, jax.random.PRNGKey(5))
        want = perplexity(sc.model(runtime=RUNTIME), p, seqs, batch_size=2)["ppl"]
        np.testing.assert_allclose(ar[layer], want, rtol=1e-5)
    # every candidate, the padded last group's one (ar[3]) included, equals its score with no
    # group (one candidate per call, nothing padded); rtol as above
    one_at_a_time = select.policy_scores(
        "ar", select.LayerScoring(CFG, mixer, teacher, mixers, seqs, batch_size=2, parallel=1)
    )
    np.testing.assert_allclose(ar, one_at_a_time, rtol=1e-5)
    # GA-S2: candidate l keeps only layer l, the given mixers elsewhere
    scoring = select.LayerScoring(CFG, mixer, teacher, mixers, seqs, batch_size=3, parallel=4)
    ga = select.policy_scores("ga_s2", scoring)
    for layer in (2,):
        sc = StudentConfig(CFG, (layer,), mixer.config)
        p = select.assemble_student(teacher, mixers, sc)
        want = perplexity(sc.model(runtime=RUNTIME), p, seqs, batch_size=3)["ppl"]
        np.testing.assert_allclose(ga[layer], want, rtol=1e-5)
    keep, scores = select.choose_layers("ga_s2", 0.5, scoring)
    np.testing.assert_allclose(scores, ga, rtol=1e-6)
    assert keep == tuple(sorted(np.argsort(ga, kind="stable")[:2].tolist()))


def test_keep_mask_refuses_layers_outside_the_model():
    assert select.keep_mask((0, 3), 4).tolist() == [True, False, False, True]
    for keep in [(-1,), (4,)]:  # -1 wrapped around to the last layer
        with pytest.raises(ValueError, match="not layers of a 4-layer model"):
            select.keep_mask(keep, 4)
