"""generate(): greedy == argmax of full forward re-runs, padding, EOS, sampling options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.convert.naive import copy_init
from taylorcal_jax.eval.generate import generate, generate_stream, sample_logits, truncated_logits
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_params

CFG = tiny_model_config(vocab_size=47)
TEACHER_PARAMS = None


def _teacher():
    global TEACHER_PARAMS
    if TEACHER_PARAMS is None:
        TEACHER_PARAMS = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
    return Transformer(CFG), TEACHER_PARAMS


def _student(conv):
    _, tparams = _teacher()
    sc = StudentConfig.from_teacher(CFG, (1,), mixer="gdn", use_short_conv=conv)
    return sc.model(), copy_init(tparams, sc, jax.random.PRNGKey(1))


def _argmax_of_rerun(model, params, prompt, generated):
    """argmax of one full forward (no cache) over prompt + generated, at the generated slots."""
    seq = jnp.asarray(list(prompt) + list(generated))[None]
    logits, _, _ = jax.jit(model.apply)({"params": params}, seq)
    return jnp.argmax(logits[0, len(prompt) - 1 : -1], axis=-1).tolist()


@pytest.mark.parametrize("which", ["teacher", "student_conv"])
def test_greedy_equals_rerun_and_left_padding(which):
    model, params = _teacher() if which == "teacher" else _student(True)
    prompts = [[3, 9, 27, 4, 11], [8, 1]]
    p = max(map(len, prompts))
    tokens = np.zeros((2, p), np.int32)
    valid = np.zeros((2, p), bool)
    for i, s in enumerate(prompts):
        tokens[i, p - len(s) :], valid[i, p - len(s) :] = s, True
    out = generate(model, params, tokens, valid_bt=valid, max_new_tokens=6)
    assert out["tokens"].shape == (2, 6) and bool(out["valid"].all())
    for i, s in enumerate(prompts):
        generated = out["tokens"][i].tolist()
        assert generated == _argmax_of_rerun(model, params, s, generated)


def test_a_prompt_not_left_padded_is_refused():
    model, params = _teacher()
    tokens = np.ones((3, 4), np.int32)
    right = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]], bool)  # rows 1, 2: pads inside
    with pytest.raises(ValueError, match=r"prompt rows \[1, 2\] are not left-padded"):
        generate(model, params, tokens, valid_bt=right, max_new_tokens=2)


def test_ids_outside_the_vocabulary_and_degenerate_temperatures_are_refused():
    """An id outside the vocabulary embeds as NaN (every later token the argmax of NaN, id 0)
    and so does a temperature float32 rounds to 0 (logits / 0); both were accepted."""
    model, params = _teacher()
    ok = np.ones((1, 3), np.int32)
    for tokens, kw, match in [
        (
            np.array([[1, CFG.vocab_size, 2]]),
            {},
            r"\[0, 47\), got \[1, 47\]",
        ),
        (np.array([[-1, 2, 3]]), {}, r"got \[-1, 3\]"),
        (np.array([[CFG.vocab_size, 2, 3]]), {"valid_bt": np.array([[0, 1, 1]], bool)}, "got"),
        (ok, {"temperature": float("nan"), "rng": jax.random.PRNGKey(0)}, "temperature must be 0"),
        (ok, {"temperature": 1e-300, "rng": jax.random.PRNGKey(0)}, "temperature must be 0"),
        (ok, {"temperature": float("inf"), "rng": jax.random.PRNGKey(0)}, "temperature must be 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, params, tokens, max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="vocabulary"):
        next(generate_stream(model, params, np.array([[50]]), max_new_tokens=2))


def test_eos_stops_rows():
    model, params = _teacher()
    prompt = jnp.array([[3, 9, 27], [5, 2, 6]])
    free = generate(model, params, prompt, max_new_tokens=5)["tokens"]
    eos = int(free[0, 1])
    out = generate(model, params, prompt, max_new_tokens=5, eos_token_id=eos, pad_id=-1)
    toks, valid = np.asarray(out["tokens"]), np.asarray(out["valid"])
    for i in range(2):
        row = np.asarray(free[i]).tolist()
        stop = row.index(eos) + 1 if eos in row else 5
        assert valid[i].tolist() == [j < stop for j in range(5)]
        assert toks[i, :stop].tolist() == row[:stop]
        assert (toks[i, stop:] == -1).all()


def test_several_end_ids_stop_rows_at_the_first_of_them():
    model, params = _teacher()
    prompt = jnp.array([[3, 9, 27], [5, 2, 6]])
    free = np.asarray(generate(model, params, prompt, max_new_tokens=6)["tokens"]).tolist()
    ends = (free[0][3], free[1][1])  # row 0 ends at its 4th token, row 1 at its 2nd (or sooner)
    out = generate(model, params, prompt, max_new_tokens=6, eos_token_id=ends, pad_id=-1)
    streamed = list(generate_stream(model, params, prompt, max_new_tokens=6, eos_token_id=ends))
    for i, row in enumerate(free):
        stop = next(j for j, t in enumerate(row) if t in ends) + 1
        assert np.asarray(out["valid"][i]).tolist() == [j < stop for j in range(6)]
        assert np.asarray(out["tokens"][i]).tolist() == row[:stop] + [-1] * (6 - stop)
    assert len(streamed) == max(next(j for j, t in enumerate(r) if t in ends) + 1 for r in free)


def test_sampling_reproducible_and_truncated():
    model, params = _student(False)
    prompt = jnp.array([[3, 9, 27, 4]] * 3)
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = generate(model, params, prompt, rng=jax.random.PRNGKey(7), **kw)["tokens"]
    b = generate(model, params, prompt, rng=jax.random.PRNGKey(7), **kw)["tokens"]
    c = generate(model, params, prompt, rng=jax.random.PRNGKey(8), **kw)["tokens"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, params, prompt, max_new_tokens=8)["tokens"]
    top1 = generate(model, params, prompt, rng=jax.random.PRNGKey(7), top_k=1, **kw)["tokens"]
    np.testing.assert_array_equal(top1, greedy)
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, params, prompt, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, prompt, max_new_tokens=2, top_p=0.0)


def test_sample_logits_truncation():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    rngs = jax.random.PRNGKey(0)
    k2 = np.asarray(sample_logits(logits, rngs, temperature=1.0, top_k=2, top_p=None))
    assert set(np.unique(k2)) == {0, 1}
    np.testing.assert_allclose((k2 == 0).mean(), 0.5 / 0.8, atol=0.03)
    p = np.asarray(sample_logits(logits, rngs, temperature=1.0, top_k=None, top_p=0.85))
    assert set(np.unique(p)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third is needed
    full = np.asarray(sample_logits(logits, rngs, temperature=1.0, top_k=None, top_p=None))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                               atol=0.03)  # fmt: skip


def test_truncation_that_keeps_everything_cuts_nothing():
    # a large vocabulary's float32 cumulative sum reaches 1 before its tail: top_p = 1 must not
    # drop that tail; top_k beyond the vocabulary must not fail
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 150_000))
    before = jnp.cumsum(jax.nn.softmax(jnp.sort(logits)[:, ::-1]), axis=-1)
    assert bool(jnp.any(before[:, :-1] >= 1.0))  # the case: the sum is 1 before the end
    for top_k, top_p in ((None, 1.0), (150_000, None), (200_000, 1.0)):
        np.testing.assert_array_equal(truncated_logits(logits, top_k, top_p), logits)
    assert int(jnp.sum(jnp.isfinite(truncated_logits(logits, 5, None)))) == 4 * 5


@pytest.mark.parametrize("which", ["teacher", "student_conv"])
def test_last_logits_only_equals_last_row_of_full_logits(which):
    model, params = _teacher() if which == "teacher" else _student(True)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (3, 13), 1, CFG.vocab_size)
    valid = jnp.ones((3, 13), bool).at[1, :4].set(False)  # a left-padded row
    full, _, _ = model.apply({"params": params}, tokens, valid_bt=valid)
    last, _, _ = model.apply({"params": params}, tokens, valid_bt=valid, last_logits_only=True)
    assert last.shape == (3, 1, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-5)
