"""Pretraining: learning happens, resume after an interruption loses nothing."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from taylorcal_jax.train import pretrain as pretrain_lib
from taylorcal_jax.utils import sharding

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402
from tiny_models import tiny_model_config
from tiny_pretraining import tiny_pretraining

VOCAB = 24


def _setup():
    cfg = tiny_model_config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return tiny_pretraining(cfg, cycles=60)


def _max_rel_err(a, b):
    errs = jax.tree_util.tree_map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)), a, b
    )
    return max(jax.tree_util.tree_leaves(errs))


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    model, params, stream, opts = _setup()
    losses = {}
    full = pretrain_lib.pretrain(
        model,
        params,
        stream,
        opts,
        str(tmp_path / "a"),
        log_fn=lambda s, v: losses.setdefault(s, v.get("loss")),
    )
    assert int(full["step"]) == 8 and int(full["tokens"]) == 8 * 4 * 12
    assert losses[8] < losses[1] - 0.1  # it learns the cycle

    # Crash after 5 steps: the last checkpoint is step 3, steps 4-5 are lost and redone.
    out = pretrain_lib.pretrain(
        model, params, stream, opts, str(tmp_path / "b"), stop_after_steps=5
    )
    assert out is None
    assert sorted(os.listdir(tmp_path / "b")) == ["3"]
    events = []
    resumed = pretrain_lib.pretrain(
        model, params, stream, opts, str(tmp_path / "b"), log_fn=lambda s, v: events.append(v)
    )
    assert events[0] == {"resumed_from_step": 3, "tokens": 3 * 4 * 12}
    assert int(resumed["step"]) == 8 and int(resumed["tokens"]) == int(full["tokens"])
    assert _max_rel_err(resumed["params"], full["params"]) == 0.0  # bit-identical
    assert _max_rel_err(resumed["opt_state"], full["opt_state"]) == 0.0
    # Starting again after completion does no more work and returns the final state.
    again = pretrain_lib.pretrain(model, params, stream, opts, str(tmp_path / "b"))
    assert _max_rel_err(again["params"], full["params"]) == 0.0
    # Each batch split over 4 devices: the same training up to float summation order.
    split = pretrain_lib.pretrain(
        model,
        params,
        stream,
        opts,
        str(tmp_path / "c"),
        mesh=sharding.make_mesh({"data": 4}, jax.devices()[:4]),
    )
    assert _max_rel_err(jax.device_get(split["params"]), full["params"]) <= 1e-5
    with pytest.raises(ValueError, match="batch_size 4 does not split"):
        pretrain_lib.pretrain(
            model, params, stream, opts, str(tmp_path / "d"), mesh=sharding.make_mesh({"data": 8})
        )


def test_every_logged_row_carries_the_tokens_seen(tmp_path):
    """Evaluation rows too: the training curves plot only rows with tokens."""
    model, params, stream, opts = _setup()
    opts = dataclasses.replace(opts, eval_every=3)
    rows = []
    pretrain_lib.pretrain(
        model,
        params,
        stream,
        opts,
        str(tmp_path),
        eval_fn=lambda p: {"valid_ppl": 2.0},
        log_fn=lambda s, v: rows.append((s, v)),
    )
    evals = [(s, v["tokens"]) for s, v in rows if "valid_ppl" in v]
    assert evals == [(3, 3 * 48), (6, 6 * 48)]
    assert all(v["tokens"] == s * 48 for s, v in rows)


@pytest.mark.parametrize(
    "key,value,match",
    [("steps", -1, "steps"), ("warmup_steps", 99, "warmup"), ("learning_rate", 0.0, "learning")],
)
def test_bad_options(key, value, match):
    cfg = tiny.get_config("smoke").pretrain
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
        pretrain_lib.PretrainOptions.from_config(cfg)


def test_a_one_step_run_warmed_up_over_its_step_is_refused():
    """Its one update had lr 0: the teacher stayed as initialised and the run exited 0."""
    cfg = tiny.get_config("smoke").pretrain
    cfg.steps, cfg.warmup_steps = 1, 1
    with pytest.raises(ValueError, match="not the one step of a one-step run"):
        pretrain_lib.PretrainOptions.from_config(cfg)
    cfg.warmup_steps = 0
    pretrain_lib.PretrainOptions.from_config(cfg)
