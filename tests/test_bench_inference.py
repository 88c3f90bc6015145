"""launch/bench_inference.py: the decode roofline's bytes against a hand count, the random
weights, the batch replication, the targets, the settings' errors, and the small preset end
to end on the CPU (a subprocess, as the script runs)."""

import json
import os
import subprocess
import sys

import bench_inference as bench  # from launch/ (tests/conftest.py)
import jax
import jax.numpy as jnp
import model_shapes
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The small preset by hand: D=64 hidden, H=4 heads of d=16, Hkv=2, F=128 MLP, V=256 vocab, 4
# layers, float32 (4 bytes); the student keeps attention in layer 0 (keep_every=4) and has GDN
# (H=4 heads, K=V=16, no short convolution) in layers 1-3.
D, H, HKV, HD, F, V, LAYERS, FP32 = 64, 4, 2, 16, 128, 256, 4, 4
NORMS = 2 * D  # input and post-attention RMSNorm scales of a block
MLP = 3 * D * F  # gate, up, down
ATTENTION = D * H * HD + 2 * D * HKV * HD + H * HD * D  # q, k, v, o
ATTENTION += H * HD + 2 * HKV * HD  # qwen2's q, k, v biases
GDN = 4 * D * H * HD + H * HD * D + 2 * D * H + 2 * H + HD  # q,k,v,g; o; a,b; A_log, dt_bias; norm
TEACHER_WEIGHTS = FP32 * (V * D + D + LAYERS * (NORMS + ATTENTION + MLP))  # embed, final norm
STUDENT_WEIGHTS = FP32 * (V * D + D + (NORMS + ATTENTION + MLP) + 3 * (NORMS + GDN + MLP))


def _hand_step_bytes(batch, context, steps, attention_layers, gdn_layers, weights):
    kv_slot = 2 * batch * HKV * HD * FP32  # K and V of one slot of one layer
    kv_read = attention_layers * kv_slot * (context + (steps + 1) / 2)
    state = gdn_layers * 2 * batch * H * HD * HD * FP32  # [B, H, K, V] fp32, read and written
    return {
        "weights": weights,
        "kv_read": kv_read,
        "kv_write": attention_layers * kv_slot,
        "state_read_write": state,
        "total": weights + kv_read + attention_layers * kv_slot + state,
    }


def _hand_cache_bytes(batch, slots, attention_layers, gdn_layers):
    attention = 2 * batch * slots * HKV * HD * FP32  # k, v
    slot_record = batch * slots + 4  # valid, index: one for all attention layers
    gdn = batch * H * HD * HD * FP32
    return attention_layers * attention + slot_record + gdn_layers * gdn + 4 * batch


HAND = {  # model -> (attention layers, GDN layers, weight bytes)
    "teacher": (LAYERS, 0, TEACHER_WEIGHTS),
    "student": (1, 3, STUDENT_WEIGHTS),
}


def _small_models():
    p = bench.settings("small")
    cfg = model_shapes.qwen2_config(p, 256)
    return bench.build_models(cfg, (0,), jnp.float32, "auto")


def test_models_take_the_runtimes_defaults_unless_told():
    from taylorcal_jax.models.layers import AttentionRuntime
    from taylorcal_jax.models.mixers.gdn import GDNRuntime

    teacher, student = _small_models()
    assert teacher.attention_runtime == student.attention_runtime == AttentionRuntime()
    assert student.student_mixer.runtime == GDNRuntime(impl="auto")
    cfg = model_shapes.qwen2_config(bench.settings("small"), 256)
    _, student = bench.build_models(cfg, (0,), jnp.float32, "auto", gdn_fused=False, gemv="xla")
    runtime = student.student_mixer.runtime
    assert not runtime.fused_projections and runtime.gemv_impl == "xla"
    assert student.attention_runtime.gemv_impl == "xla"


def test_weights_and_step_bytes_equal_the_hand_count():
    teacher, student = _small_models()
    batch, context, steps = 3, 64, 4
    for name, model in (("teacher", teacher), ("student", student)):
        cache = jax.eval_shape(lambda m=model: bench.empty_cache(m, batch, context + steps))
        got = bench.decode_step_bytes(bench.weight_bytes(model, jnp.float32), cache, context, steps)
        assert got == _hand_step_bytes(batch, context, steps, *HAND[name]), name
        want_cache = _hand_cache_bytes(batch, context + steps, *HAND[name][:2])
        assert bench.tree_bytes(cache) == want_cache, name


def test_random_params_shapes_values_and_finite_logits():
    teacher, student = _small_models()
    for model in (teacher, student):
        want = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), int)))
        params = model_shapes.random_params(model, jax.random.PRNGKey(1), jnp.bfloat16)
        got_shapes = jax.tree.map(lambda x: x.shape, params)
        assert got_shapes == jax.tree.map(lambda x: x.shape, want["params"])
        for x in jax.tree.leaves(params):
            assert x.dtype == jnp.bfloat16
            if x.ndim <= 1:
                assert bool(jnp.all(x == 1))
            else:  # N(0, 1/fan_in): the sample std within 15% (>= 256 draws)
                std = float(jnp.std(x.astype(jnp.float32)))
                assert abs(std * np.sqrt(x.shape[0]) - 1) < 0.15, x.shape
        tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 0, V)
        logits = model.clone(dtype=jnp.bfloat16).apply({"params": params}, tokens)[0]
        assert bool(jnp.isfinite(logits).all()) and float(jnp.std(logits)) > 0


def test_replicate_batch_tiles_every_batch_leaf():
    cache = {"a": {"k": jnp.arange(6.0).reshape(1, 3, 2), "index": jnp.asarray(5)}}
    got = bench.replicate_batch(cache, 4)
    assert got["a"]["k"].shape == (4, 3, 2) and bool(jnp.all(got["a"]["k"] == cache["a"]["k"]))
    assert int(got["a"]["index"]) == 5
    assert bench.replicate_batch(cache, 1) is cache
    with pytest.raises(ValueError, match=r"\['a'\]\['k'\].*no leading batch axis"):
        bench.replicate_batch({"a": {"k": jnp.zeros((2, 3))}}, 4)


def _entry(decode_tokens_per_s, fraction, prefill=None):
    return {
        "decode_tokens_per_s": decode_tokens_per_s,
        "roofline_fraction": fraction,
        "prefill_tokens_per_s": prefill,
        "decode_bytes_per_step": {"total": 1.0},
        "cache_bytes": 1.0,
    }


def test_targets_met_missed_and_not_measured():
    rows = [
        {"context": 32768, "batch": 16, "teacher": _entry(100, 0.8), "student": _entry(230, 0.69)},
        {"context": 16384, "batch": 1, "teacher": _entry(50, 0.7, 900)},
    ]
    rows[1]["student"] = _entry(60, 0.9, 899)
    for row in rows:
        bench.add_ratios(row)
    checks = {c["target"]: (c["met"], c["value"]) for c in bench.evaluate_targets(rows)}
    assert checks["L=32768 B=16 teacher decode >= 70% of its roofline"] == (True, 0.8)
    assert checks["L=32768 B=16 student decode >= 70% of its roofline"] == (False, 0.69)
    assert checks["L=16384 B=1 teacher decode >= 70% of its roofline"] == (True, 0.7)
    assert checks["L=32768 B=16 decode student/teacher >= 2.2x"] == (True, 2.3)
    assert checks["L=65536 B=16 decode student/teacher >= 2.7x"] == (None, None)
    met, value = checks["L=16384 B=1 student prefill >= teacher's"]
    assert met is False and value == pytest.approx(899 / 900)
    assert len(checks) == 7  # no prefill check where the prefill was not timed


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batches="2,16"), "--batches must include 1"),
        (dict(contexts="4096,x"), "--contexts must be comma-separated integers"),
        (dict(contexts="0"), "--contexts must be positive integers"),
        (dict(keep_every=1), r"--keep_every must be in \[2, 4\]"),
        (dict(repeats=0), "--repeats must be >= 1"),
        (dict(gdn_impl="triton"), "--gdn_impl must be one of"),
        (dict(max_prefill_tokens=-1), "--max_prefill_tokens must be >= 0"),
        (dict(decode_attention="xla,triton"), "--decode_attention must list distinct entries"),
        (dict(decode_attention="xla,xla"), "--decode_attention must list distinct entries"),
        (dict(gdn_decode="triton"), "--gdn_decode must be one of"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(bench.SettingsError, match=message) as e:
        bench.settings("small", **overrides)
    assert "\n" not in str(e.value)


def test_small_preset_end_to_end(tmp_path):
    # one context, batches 1 and 2 (prefill timed at both: 2 x 64 <= 256 tokens); each decode by
    # the XLA decoding attention and the Pallas kernel, the student's GDN layers by the Pallas
    # decoding step (interpret mode here)
    cmd = [sys.executable, os.path.join(REPO, "launch", "bench_inference.py"), "--preset=small",
           "--contexts=64", "--repeats=1", f"--out={tmp_path}", "--tag=test",
           "--decode_attention=xla,pallas", "--gdn_decode=pallas"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("L=64 B=1 teacher: prefill", "L=64 B=2 student: prefill", "of its roofline"):
        assert line in run.stdout
    result = json.loads((tmp_path / "bench_inference_test.json").read_text())
    assert result["complete"] and (tmp_path / "bench_inference_test.png").stat().st_size > 0
    md = (tmp_path / "bench_inference_test.md").read_text()
    assert "Targets:" in md and "| xla ms/step (of roofline) | pallas ms/step" in md
    assert result["decode_attention"] == result["decode_attention_resolved"] == ["xla", "pallas"]
    assert result["gdn_decode"] == result["gdn_decode_resolved"] == "pallas"
    assert "GDN decoding step pallas" in md
    # (prefill, decode by xla, decode by pallas) x (B=1, B=2) x 2 models, each compiled once
    programs = result["programs"]
    assert len(programs) == 12 and all(x["compile_s"] > 0 for x in programs.values())
    assert "teacher decode[pallas] S=68 B=2" in programs
    assert [(r["context"], r["batch"]) for r in result["rows"]] == [(64, 1), (64, 2)]
    bandwidth = result["copy_bandwidth_bytes_per_s"]
    for row in result["rows"]:
        for name in ("teacher", "student"):
            m = row[name]
            want = _hand_step_bytes(row["batch"], 64, 4, *HAND[name])
            assert m["decode_bytes_per_step"] == want
            assert m["cache_bytes"] == _hand_cache_bytes(row["batch"], 68, *HAND[name][:2])
            assert m["prefill_tokens_per_s"] == pytest.approx(row["batch"] * 64 / m["prefill_s"])
            assert m["decode_tokens_per_s"] == pytest.approx(row["batch"] / m["decode_s_per_step"])
            assert m["roofline_s_per_step"] == pytest.approx(want["total"] / bandwidth)
            ratio = m["roofline_s_per_step"] / m["decode_s_per_step"]
            assert m["roofline_fraction"] == pytest.approx(ratio)
            by_impl = m["decode_by_impl"]
            assert list(by_impl) == ["xla", "pallas"]  # the first one's figures are the row's
            assert by_impl["xla"]["decode_s_per_step"] == m["decode_s_per_step"]
            pallas = by_impl["pallas"]
            assert pallas["roofline_fraction"] == pytest.approx(
                m["roofline_s_per_step"] / pallas["decode_s_per_step"]
            )
        assert row["decode_roofline_speedup"] == pytest.approx(
            row["teacher"]["decode_bytes_per_step"]["total"]
            / row["student"]["decode_bytes_per_step"]["total"]
        )
    assert sum(c["met"] is None for c in result["targets"]) == 2  # 32k and 64k at batch 16
