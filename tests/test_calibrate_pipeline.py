"""The calibration stages end to end from taylorcal_jax.main on the smoke config."""

import io
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
    assert report["phase1_parts"] == list(c.calibration.phase1_parts)  # the default: output gate
    assert (report["student"], report["layers_from"]) == ("student", "calibration/aligned")
    sc, params = load_student(os.path.join(workdir, "student"))
    assert list(sc.keep_full_attention_layers) == keep
    # ga_s2 keeps the layer with the lowest candidate perplexity
    cand = summary["select_layers"]["candidate_ppl"]
    assert keep == [int(np.argmin(cand))]
    with open(os.path.join(workdir, "calibration", "init_report.json")) as f:
        taylor = json.load(f)["taylor"]
    with open(os.path.join(workdir, "calibration", "align_report.json")) as f:
        curves = json.load(f)["align"]["curve"]
    cal = c.calibration
    for row in report["layers"]:
        i = row["layer"]
        assert row["converted"] == (i not in keep)
        # the report's rows are the alignment's: the loss before the first update, and of the
        # best params kept (the curve holds the losses before each update, not after the last)
        assert row["align_loss_before"] == curves[i][0]
        assert row["align_loss_after"] <= min(curves[i])
        np.testing.assert_allclose(row["layer_loss"], row["align_loss_after"], rtol=1e-4)
        assert len(row["half_life"]) == c.teacher.num_attention_heads
        # phase 1's fitted value scale, clipped (reported though the default does not apply it)
        want = np.clip(taylor["sigma_raw"][i], cal.sigma_min, cal.sigma_max)
        np.testing.assert_allclose(row["value_scale"], want, rtol=1e-6)
    assert any(r["align_loss_after"] < r["align_loss_before"] for r in report["layers"])
    ev = summary["eval_student"]
    assert np.isfinite(ev["student_ppl"]) and ev["student_ppl"] > 1
    assert ev["teacher_ppl"] == pytest.approx(summary["pretrain"]["valid_ppl"], rel=1e-6)


def test_student_ppl_equals_keep_flag_scoring(run_dir):
    """The saved student and the vmapped scorer used by the policies agree."""
    from taylorcal_jax.calibrate import pipeline, select
    from taylorcal_jax.models.student import load_student
    from taylorcal_jax.run.context import RunContext

    workdir, c, summary = run_dir
    sc, student = load_student(os.path.join(workdir, "student"))
    ctx = RunContext(c, workdir)
    mcfg, teacher = ctx.teacher
    _, all_layers = load_student(pipeline.final_mixers_dir(c, workdir))
    mixers = select.mixers_of(all_layers, sc.mixer_name, mcfg.num_hidden_layers)
    for i in range(mcfg.num_hidden_layers):
        if i not in sc.keep_full_attention_layers:
            jax.tree.map(np.testing.assert_array_equal, student[f"layers_{i}"]["gdn"], mixers[i])
    seqs = ctx.sequences(c.eval)
    union = select.union_params(teacher, mixers, sc.mixer_name)
    mask = select.keep_mask(sc.keep_full_attention_layers, mcfg.num_hidden_layers)[None]
    mixer = pipeline.student_mixer(c, mcfg)
    ppl = select.score_keep_masks(mcfg, mixer, union, mask, seqs, batch_size=4, parallel=1)
    np.testing.assert_allclose(ppl[0], summary["eval_student"]["student_ppl"], rtol=1e-5)


def _run_quietly(config, workdir, **options):
    from taylorcal_jax import main
    from taylorcal_jax.run.console import Console

    out = io.StringIO()
    results = main.run(config, workdir, console=Console(out), **options)
    return results, out.getvalue()


def test_rerun_skips_then_a_new_keep_set_reruns_only_selection_and_evaluation(run_dir):
    workdir, c, summary = run_dir
    results, out = _run_quietly(c, workdir)
    assert out.count("skipped (done, settings unchanged)") == 6
    assert results["eval_student"]["student_ppl"] == summary["eval_student"]["student_ppl"]
    changed = c.copy_and_resolve_references()
    changed.select.keep_layers = (1,)
    results, out = _run_quietly(changed, workdir)
    assert out.count("skipped (done, settings unchanged)") == 4
    assert "[5/6] select_layers: " in out and "run: settings changed: select.keep_layers" in out
    assert "run: inputs changed: select_layers" in out
    assert results["select_layers"]["keep_full_attention_layers"] == [1]
    assert results["eval_student"]["keep_full_attention_layers"] == [1]
    _run_quietly(c, workdir)  # back to the fixture's student for the other tests


def test_exported_teacher_loads_in_transformers_and_serves_as_teacher_path(run_dir, tmp_path):
    """The pretrained teacher is a plain HF checkpoint: transformers gives the same logits,
    and as teacher.path (its own tokenizer, no pretraining) it gives the same perplexity."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taylorcal_jax.models.teacher import Transformer
    from taylorcal_jax.run.context import RunContext

    workdir, c, summary = run_dir
    tdir = os.path.join(workdir, "teacher")
    hf_tok = AutoTokenizer.from_pretrained(tdir)
    hf_model = AutoModelForCausalLM.from_pretrained(tdir, torch_dtype=torch.float32).eval()
    text = "def main():\n    return 0\n"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids) == text
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    mcfg, params = RunContext(c, workdir).teacher
    ours, _, _ = Transformer(mcfg).apply({"params": params}, jnp.asarray([ids], jnp.int32))
    assert np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)) <= 1e-4

    external = c.copy_and_resolve_references()
    external.teacher.path = tdir
    external.stages = ("pretrain", "eval_teacher")
    other = str(tmp_path / "other")
    results, out = _run_quietly(external, other)
    assert "[1/2] pretrain: skipped (teacher.path is set)" in out
    ppl = results["eval_teacher"]["valid_ppl"]
    assert ppl == pytest.approx(summary["eval_student"]["teacher_ppl"], rel=1e-5)
    assert not os.path.exists(os.path.join(other, "data", "tokenizer"))  # none trained


def test_settings_the_strategy_or_policy_leaves_unused_rerun_nothing():
    """A stage's fingerprint holds what its result depends on: phase 1's constants only for a
    strategy with phase 1 (phase1_parts not for the published one, which writes all four
    parts), the scoring text only for a policy that scores, the policy not when keep_layers
    names the layers. They reran calibrate or select_layers and every stage after them."""
    import tiny  # configs/tiny.py

    from taylorcal_jax.calibrate.pipeline import STAGES

    def changes(stage, base, **changed):
        config = tiny.get_config("smoke")
        for key, value in {**base, **changed}.items():
            section, name = key.split("__")
            config[section][name] = value
        before = tiny.get_config("smoke")
        for key, value in base.items():
            section, name = key.split("__")
            before[section][name] = value
        return STAGES[stage].settings(config) != STAGES[stage].settings(before)

    for strategy, used in [("copy", False), ("align_only", False), ("taylor_calibrate", True)]:
        base = {"calibration__strategy": strategy}
        assert changes("calibrate", base, calibration__gamma_min=0.01) == used, strategy
    published = {"calibration__strategy": "taylor_calibrate_published"}
    assert not changes("calibrate", published, calibration__phase1_parts=("decay",))
    assert changes("calibrate", published, calibration__gamma_min=0.01)
    taylor = {"calibration__strategy": "taylor_calibrate"}
    assert changes("calibrate", taylor, calibration__phase1_parts=("decay",))
    assert not changes("select_layers", {"select__policy": "uniform"}, select__seed=5)
    assert changes("select_layers", {"select__policy": "uniform"}, select__kept_fraction=0.5)
    assert changes("select_layers", {"select__policy": "ar"}, select__seed=5)
    explicit = {"select__keep_layers": (1,)}
    assert not changes("select_layers", explicit, select__policy="ar", select__kept_fraction=0.5)
    assert changes("select_layers", explicit, select__keep_layers=(0,))
