"""The calibration stages end to end from taylorcal_jax.main on the smoke config."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import tiny  # configs/tiny.py

    from taylorcal_jax import main

    workdir = str(tmp_path_factory.mktemp("calib"))
    c = tiny.get_config("smoke")
    c.stages = ("pretrain", "statistics", "calibrate", "align", "select_layers", "eval_student")
    c.calibration.num_sequences = 2
    c.calibration.seq_len = 24
    c.calibration.block_size = 8
    c.calibration.align.steps = 4
    c.calibration.align.lr_qkv = 1e-3
    c.calibration.align.lr_gates = 1e-2
    c.calibration.gdn.impl = "chunked"
    c.calibration.gdn.chunk_size = 8
    c.select.policy = "ga_s2"
    c.select.kept_fraction = 0.5
    c.select.num_sequences = 2
    c.select.seq_len = 24
    c.eval.num_sequences = c.pretrain.eval_sequences  # the sequences pretrain evaluates on
    summary = main.run(c, workdir)
    return workdir, c, summary


def test_stages_write_student_report_and_plot(run_dir):
    from taylorcal_jax.models.student import load_student

    workdir, c, summary = run_dir
    report = json.load(open(os.path.join(workdir, "calibration_report.json")))
    assert os.path.getsize(os.path.join(workdir, "calibration_report.png")) > 10_000
    n_layers = c.teacher.num_hidden_layers
    assert len(report["layers"]) == n_layers
    keep = report["keep_full_attention_layers"]
    assert len(keep) == 1  # 50% of 2 layers
    sc, params = load_student(os.path.join(workdir, "student"))
    assert list(sc.keep_full_attention_layers) == keep
    # ga_s2 keeps the layer with the lowest candidate perplexity
    cand = summary["select_layers"]["candidate_ppl"]
    assert keep == [int(np.argmin(cand))]
    for row in report["layers"]:
        assert row["converted"] == (row["layer"] not in keep)
        assert row["align_loss_after"] <= row["align_loss_before"]
        np.testing.assert_allclose(row["layer_loss"], row["align_loss_after"], rtol=1e-4)
        assert len(row["half_life"]) == c.teacher.num_attention_heads
        assert min(row["teacher_distance"]) >= 0.5
        assert all(0.1 <= s <= 10 for s in row["value_scale"])
    ev = summary["eval_student"]
    assert np.isfinite(ev["student_ppl"]) and ev["student_ppl"] > 1
    assert ev["teacher_ppl"] == pytest.approx(summary["pretrain"]["valid_ppl"], rel=1e-6)


def test_student_ppl_equals_blended_scoring(run_dir):
    """The saved student and the vmapped scorer used by the policies agree."""
    from taylorcal_jax.calibrate import pipeline, select
    from taylorcal_jax.models.student import load_student
    from taylorcal_jax.run.context import RunContext

    workdir, c, summary = run_dir
    sc, student = load_student(os.path.join(workdir, "student"))
    ctx = RunContext(c, workdir)
    mcfg, teacher = ctx.teacher
    _, all_layers = load_student(pipeline.final_mixers_dir(c, workdir))
    mixers = {i: all_layers[f"layers_{i}"]["gdn"] for i in range(mcfg.num_hidden_layers)}
    for i in range(mcfg.num_hidden_layers):
        if i not in sc.keep_full_attention_layers:
            jax.tree.map(np.testing.assert_array_equal, student[f"layers_{i}"]["gdn"], mixers[i])
    seqs = ctx.sequences(c.eval)
    union = select.union_params(teacher, mixers, mcfg.num_hidden_layers)
    mask = select.keep_mask(sc.keep_full_attention_layers, mcfg.num_hidden_layers)[None]
    ppl = select.score_keep_masks(mcfg, sc.gdn, union, mask, seqs, batch_size=4, parallel=1)
    np.testing.assert_allclose(ppl[0], summary["eval_student"]["student_ppl"], rtol=1e-5)
