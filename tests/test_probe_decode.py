"""launch/probe_decode.py: its settings, the child's environment and output lines, a failing and
a hanging variant recorded without stopping the others, and a small dry run on the CPU."""

import json

import probe_decode as probe  # from launch/ (tests/conftest.py)
import pytest


def test_rows_and_variants_parse_or_are_one_line_errors():
    assert probe.parse_rows("4096x1, 65536x16") == [(4096, 1), (65536, 16)]
    assert probe.parse_variants("op,xla_cmdbuf") == ["op", "xla_cmdbuf"]
    for call, message in [
        (lambda: probe.parse_rows("4096"), "--rows must be LxB items"),
        (lambda: probe.parse_rows("0x2"), "--rows needs positive L and B"),
        (lambda: probe.parse_variants("xla,xla"), "--variants must list distinct names"),
        (lambda: probe.parse_variants("xla,fast"), "--variants must list distinct names"),
        (lambda: probe.settings("small", layers=1), "--layers must be >= 2"),
        (lambda: probe.settings("small", repeats=0), "--repeats must be >= 1"),
    ]:
        with pytest.raises(probe.SettingsError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    p = probe.settings("qwen2_5_1_5b")
    assert p["rows"] == [(4096, 1), (4096, 16), (65536, 1), (65536, 16)] and p["layers"] == 28
    assert p["tag"] == "qwen2_5_1_5b" and probe.settings("small", layers=3)["layers"] == 3


def test_child_env_appends_the_variant_flags_only():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "HOME": "/h"}
    env = probe.child_env(probe.VARIANTS["xla_cmdbuf"], base)
    assert env["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 "
        "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    )
    assert env["HOME"] == "/h" and base["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert probe.child_env(probe.VARIANTS["pallas"], {}) == {}
    assert probe.VARIANTS["pallas_cmdbuf_unroll4"] == probe.Variant(
        "pallas", probe.COMMAND_BUFFER_WHILE, unroll=4
    )


def test_child_lines_and_row_lines():
    record = dict(kind="model", model="teacher", context=4096, batch=16, decode_s_per_step=2e-3,
                  roofline_s_per_step=1.5e-3, roofline_fraction=0.75)  # fmt: skip
    assert probe.parse_child_line(probe._PREFIX + json.dumps(record)) == record
    assert probe.parse_child_line("[  1.0 s] compiled") is None
    assert probe.row_line("xla", record) == (
        "xla L=4096 B=16 teacher: 2.000 ms/step = 75% of its roofline (1.500 ms)"
    )
    op = dict(kind="op", impl="pallas bs=64", batch=16, slots=65568, s_per_call=1e-3,
              roofline_fraction=0.5, rel_err_vs_xla=2e-3)  # fmt: skip
    assert probe.row_line("op", op) == (
        "op B=16 S=65568 pallas bs=64: 1.000 ms = 50% of the K/V read at the copy bandwidth "
        "(error vs xla, max|a-b|/max|b| 2.0e-03)"
    )


def _run(tmp_path, variants, **overrides):
    p = probe.settings("small", rows="64x1", repeats=1, out=str(tmp_path), tag="t", **overrides)
    p["variants"] = variants
    path = probe.run_parent(p)
    return json.loads(open(path).read())


def test_a_failing_variant_leaves_the_others_measured(tmp_path, monkeypatch):
    # an illegal XLA flag value: XLA aborts at start-up in that variant's child only
    bogus = probe.Variant("xla", "--xla_gpu_enable_command_buffer=+BOGUS")
    monkeypatch.setitem(probe.VARIANTS, "bogus", bogus)
    result = _run(tmp_path, ["bogus", "xla_cmdbuf"])
    assert result["complete"]
    failed, ok = result["runs"]["bogus"], result["runs"]["xla_cmdbuf"]
    assert failed["status"].startswith("failed") and failed["records"] == []
    assert any("Illegal value" in line and "BOGUS" in line for line in failed["head"])
    assert ok["status"] == "ok" and ok["start"]["xla_flags"].endswith(probe.COMMAND_BUFFER_WHILE)
    rows = [(r["context"], r["batch"], r["model"]) for r in ok["records"]]
    assert rows == [(64, 1, "teacher"), (64, 1, "student")]
    for r in ok["records"]:
        assert r["finite"] and r["roofline_fraction"] == pytest.approx(
            r["roofline_s_per_step"] / r["decode_s_per_step"]
        )


def test_op_variant_and_a_timeout_and_the_budget(tmp_path):
    result = _run(tmp_path, ["op"])
    records = result["runs"]["op"]["records"]
    impls = [r["impl"] for r in records]
    assert impls[0] == "xla" and len(impls) == 1 + len(probe.OP_CONFIGS["small"])
    assert all(r["kind"] == "op" and r["rel_err_vs_xla"] < 1e-5 for r in records)  # fp32
    timed = _run(tmp_path, ["xla", "pallas"], variant_timeout_s=2, budget_s=60,
                 min_variant_s=59)  # fmt: skip
    assert timed["runs"]["xla"]["status"] == "timed out"
    assert timed["runs"]["pallas"]["status"].startswith("skipped")


def test_filled_cache_is_a_random_block_broadcast_with_the_context_valid():
    import jax
    import jax.numpy as jnp
    import model_shapes
    import numpy as np

    p = probe.settings("small", rows="8x2")
    cfg = model_shapes.qwen2_config(p, 16)
    _, student = probe.bench.build_models(cfg, (0,), jnp.float32, "chunked", "xla")
    cache = probe.filled_cache(student, batch=2, slots=12, context=8, seed=3)
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    floats = [(jax.tree_util.keystr(k), np.asarray(x)) for k, x in leaves
              if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
    assert floats, "the student's cache has K/V and recurrent-state leaves"
    for name, x in floats:
        block = x.reshape(-1, *x.shape[-2:])
        assert np.isfinite(x).all() and np.ptp(block[0]) > 0, name  # random within a block
        assert (block == block[0]).all(), name  # the same block in every batch row and slot
    for name, x in ((jax.tree_util.keystr(k), np.asarray(x)) for k, x in leaves):
        if "valid" in name:
            assert (x == (np.arange(12) < 8)).all(), name


def test_gdn_step_variant_runs_the_kernel_in_the_student(tmp_path):
    # the student's GDN layers decode by the Pallas step (interpret mode here), the teacher
    # has none: both rows measured and finite
    assert probe.VARIANTS["pallas_gdn_step"].gdn_decode == "pallas"
    assert probe.child_env(probe.VARIANTS["pallas_gdn_step_cublas"], {}) == {
        "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"
    }
    both = probe.child_env(probe.VARIANTS["pallas_gdn_step_fused_cublas"], {"XLA_FLAGS": "--a"})
    assert both["XLA_FLAGS"].split() == ["--a", "--xla_gpu_enable_triton_gemm=false"]
    assert set(probe.parse_variants(probe.DEFAULT_VARIANTS)) <= set(probe.VARIANTS)
    result = _run(tmp_path, ["pallas_gdn_step", "pallas_gdn_step_fused"])
    for name, fused in (("pallas_gdn_step", False), ("pallas_gdn_step_fused", True)):
        run = result["runs"][name]
        assert run["status"] == "ok" and run["start"]["settings"]["gdn_decode"] == "pallas"
        assert run["start"]["settings"]["gdn_fused"] is fused
        assert [r["model"] for r in run["records"]] == ["teacher", "student"]
        assert all(r["finite"] for r in run["records"])


def test_gdn_op_variant_times_the_step_by_xla_and_by_each_launch_configuration(tmp_path):
    result = _run(tmp_path, ["gdn_op"])
    records = result["runs"]["gdn_op"]["records"]
    impls = [r["impl"] for r in records]
    assert impls[0] == "xla" and len(impls) == 1 + len(probe.GDN_OP_CONFIGS["small"])
    for r in records:
        assert r["kind"] == "gdn_op" and r["batch"] == 1 and r["s_per_step"] > 0
        assert r["rel_err_vs_xla"] < 1e-5  # fp32, 64 chained steps
        assert r["state_bytes"] == 2 * 4 * 16 * 16 * 4  # H 4, K = V = 16, fp32, read + write
    assert probe.row_line("gdn_op", records[1]).startswith("gdn_op B=1 pallas programs=264")
