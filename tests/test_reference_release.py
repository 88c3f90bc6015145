"""launch/reference_release.py: the release's student (its tensor names, made here at random for
a tiny teacher) imported into ours, checked against an independent torch forward written from
the release's layer (fla GatedDeltaNet, expand_v=1, no short conv, output gate); and the
exported calibration tokens equal those the statistics stage uses."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import reference_release as rr  # noqa: E402  (launch/ is on sys.path, see conftest)

KEEP = (0, 2)
N_LAYERS = 4


def _release_name(our_name: str) -> str:
    """Inverse of the module docstring's table, for the teacher-shaped tensors."""
    for ours, theirs in (
        ("model.embed_tokens.weight", "model.embeddings.weight"),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".mlp_norm."),
        (".self_attn.", ".attn."),
    ):
        our_name = our_name.replace(ours, theirs)
    return our_name


def _bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def teacher():
    from taylorcal_jax.models.mixers import StudentMixer
    from taylorcal_jax.models.teacher import init_params

    mcfg = tiny_model_config(num_hidden_layers=N_LAYERS)
    params = init_params(mcfg, jax.random.PRNGKey(0))
    return mcfg, params, StudentMixer.from_options("gdn", mcfg, {})


def release_tensors(mcfg, teacher_params, seed=1, keep=KEEP):
    """{release name: bf16 array}: the teacher's tensors (kept layers' attention included,
    converted layers' dropped) under the release's names, and random GDN tensors."""
    from taylorcal_jax.models import hf_io

    rng = np.random.default_rng(seed)
    out = {}
    for keys, value in jax.tree_util.tree_flatten_with_path(teacher_params)[0]:
        path = tuple(k.key for k in keys)
        name = hf_io.path_to_hf_name(path)
        layer = int(path[0].split("_")[1]) if path[0].startswith("layers_") else None
        if ".self_attn." in name and layer not in keep:
            continue
        arr = np.asarray(value).T if path[-1] == "kernel" else np.asarray(value)
        out[_release_name(name)] = _bf16(arr)
    h, d, hidden = mcfg.num_attention_heads, mcfg.head_dim, mcfg.hidden_size
    shapes = {
        "q_proj.weight": (h * d, hidden),
        "k_proj.weight": (h * d, hidden),
        "v_proj.weight": (h * d, hidden),
        "g_proj.weight": (h * d, hidden),
        "a_proj.weight": (h, hidden),
        "b_proj.weight": (h, hidden),
        "o_proj.weight": (hidden, h * d),
        "A_log": (h,),
        "dt_bias": (h,),
        "o_norm.weight": (d,),
    }
    for i in range(mcfg.num_hidden_layers):
        if i in keep:
            continue
        for leaf, shape in shapes.items():
            scale = 0.5 if leaf in ("A_log", "dt_bias") else hidden**-0.5
            a = rng.normal(size=shape) * scale + (1.0 if leaf == "o_norm.weight" else 0.0)
            out[f"model.layers.{i}.attn.{leaf}"] = _bf16(a)
    return out


def write_release_dir(path, mcfg, tensors, keep=KEEP, **config_overrides):
    from taylorcal_jax.models.safetensors_io import write_tensors

    os.makedirs(path, exist_ok=True)
    write_tensors(os.path.join(path, "model.safetensors"), tensors)
    config = {
        "model_type": "student",
        "student_name": "gdn_v4",
        "keep_full_attention_layers": list(keep),
        "num_hidden_layers": mcfg.num_hidden_layers,
        **config_overrides,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def release_gdn_forward(t, x_btd, num_heads, head_dim):
    """fla GatedDeltaNet(expand_v=1, use_short_conv=False, use_gate=True).forward, per token,
    from the release's tensors {local name: [out, in] weights}."""
    b, n, _ = x_btd.shape
    h, d = num_heads, head_dim

    def heads(w):
        return F.silu(F.linear(x_btd, w)).view(b, n, h, d)

    def l2(z):
        return z * torch.rsqrt((z * z).sum(-1, keepdim=True) + 1e-6)

    q, k, v = (
        l2(heads(t["q_proj.weight"])) * d**-0.5,
        l2(heads(t["k_proj.weight"])),
        heads(t["v_proj.weight"]),
    )
    beta = torch.sigmoid(F.linear(x_btd, t["b_proj.weight"]))
    g = -t["A_log"].exp() * F.softplus(F.linear(x_btd, t["a_proj.weight"]) + t["dt_bias"])
    state = torch.zeros(b, h, d, d)  # [K, V]
    outs = []
    for i in range(n):
        state = state * g[:, i].exp()[..., None, None]
        ki, vi = k[:, i], v[:, i]
        err = vi - torch.einsum("bhkv,bhk->bhv", state, ki)
        state = state + beta[:, i][..., None, None] * ki[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i]))
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * t["o_norm.weight"]
    o = o * F.silu(F.linear(x_btd, t["g_proj.weight"]).view(b, n, h, d))
    return F.linear(o.reshape(b, n, h * d), t["o_proj.weight"])


def test_import_maps_every_tensor_and_matches_the_release_layer(teacher, tmp_path):
    mcfg, teacher_params, mixer = teacher
    tensors = release_tensors(mcfg, teacher_params)
    path = write_release_dir(tmp_path / "rel", mcfg, tensors)
    sc, saved, shared, worst = rr.import_release_student(path, mcfg, teacher_params, mixer)

    assert sc.keep_full_attention_layers == KEEP
    assert 0 < worst <= rr.BF16_RTOL  # the shared copies are the teacher's rounded to bf16
    for i in range(N_LAYERS):
        layer = f"layers_{i}"
        if i in KEEP:  # kept attention: as saved = bf16 copy, shared = the teacher's exactly
            assert "gdn" not in shared[layer]
            jax.tree.map(np.testing.assert_array_equal, shared[layer], teacher_params[layer])
            np.testing.assert_array_equal(
                saved[layer]["self_attn"]["q_proj"]["kernel"],
                np.asarray(tensors[f"model.layers.{i}.attn.q_proj.weight"], np.float32).T,
            )
            continue
        assert "self_attn" not in shared[layer] and "self_attn" not in saved[layer]
        jax.tree.map(np.testing.assert_array_equal, shared[layer]["gdn"], saved[layer]["gdn"])
        np.testing.assert_array_equal(
            shared[layer]["mlp"]["down_proj"]["kernel"],
            teacher_params[layer]["mlp"]["down_proj"]["kernel"],
        )
        local = {
            leaf: torch.from_numpy(np.asarray(tensors[f"model.layers.{i}.attn.{leaf}"], np.float32))
            for leaf in rr.GDN_TENSORS
        }
        x = np.random.default_rng(i).normal(size=(2, 11, mcfg.hidden_size)).astype(np.float32)
        want = release_gdn_forward(
            local, torch.from_numpy(x), mcfg.num_attention_heads, mcfg.head_dim
        )
        got, _, _ = mixer.module(mcfg).apply({"params": saved[layer]["gdn"]}, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-5)

    # the imported student saves and loads as ours
    from taylorcal_jax.models.student import load_student, save_student

    save_student(tmp_path / "ours", sc, shared)
    sc2, loaded = load_student(tmp_path / "ours")
    assert sc2 == sc
    jax.tree.map(np.testing.assert_array_equal, loaded, shared)


def test_import_errors(teacher, tmp_path):
    mcfg, teacher_params, mixer = teacher
    good = release_tensors(mcfg, teacher_params)

    def attempt(name, tensors, **config):
        path = write_release_dir(tmp_path / name, mcfg, tensors, **config)
        return rr.import_release_student(path, mcfg, teacher_params, mixer)

    conv = dict(good)
    conv["model.layers.1.attn.q_conv1d.weight"] = _bf16(np.zeros((32, 1, 4)))
    with pytest.raises(rr.ReleaseImportError, match="q_conv1d"):
        attempt("conv", conv)
    with pytest.raises(rr.ReleaseImportError, match="gdn_v1"):
        attempt("v1", good, student_name="gdn_v1")
    with pytest.raises(rr.ReleaseImportError, match="layers"):
        attempt("depth", good, num_hidden_layers=N_LAYERS + 1)
    transposed = dict(good)
    transposed["model.layers.1.attn.a_proj.weight"] = good["model.layers.1.attn.a_proj.weight"].T
    with pytest.raises(rr.ReleaseImportError, match="a_proj"):
        attempt("shape", transposed)
    missing = {k: v for k, v in good.items() if k != "model.layers.3.attn.dt_bias"}
    with pytest.raises(rr.ReleaseImportError, match="dt_bias"):
        attempt("missing", missing)
    # a converted layer listed as kept: its GDN tensors have no softmax counterpart
    with pytest.raises(rr.ReleaseImportError, match="no counterpart"):
        attempt("keep", good, keep_full_attention_layers=[0, 1, 2])
    other = dict(good)  # an MLP from another teacher: far beyond bf16 rounding
    name = "model.layers.1.mlp.up_proj.weight"
    other[name] = _bf16(np.asarray(good[name], np.float32) * 1.05)
    with pytest.raises(rr.ReleaseImportError, match="same teacher"):
        attempt("other", other)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke config's teacher and calibration statistics, run once: (config, workdir)."""
    import tiny  # configs/tiny.py

    from taylorcal_jax import main

    c = tiny.get_config("smoke")
    c.stages = ("pretrain", "statistics")
    c.calibration.num_sequences = 2
    c.calibration.seq_len = 24
    c.calibration.block_size = 8
    workdir = str(tmp_path_factory.mktemp("smoke") / "w")
    main.run(c, workdir)
    return c, workdir


def test_export_and_evaluate_on_the_smoke_pipeline(smoke_run, tmp_path):
    """Exported calibration tokens are the statistics stage's; a release student of the smoke
    teacher is imported, saved as ours and scored on the exported eval tokens."""
    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.student import load_student
    from taylorcal_jax.run.context import RunContext

    c, workdir = smoke_run
    tokens_dir = str(tmp_path / "tokens")
    info = rr.export_tokens(RunContext(c, workdir), tokens_dir, {"command": "test"})
    cal = np.load(tmp_path / "tokens" / rr.CAL_FILE)
    stats = np.load(os.path.join(workdir, "calibration", "stats.npz"))
    np.testing.assert_array_equal(cal, stats["tokens_nt"])
    assert info["calibration"]["sha256"] == rr.sha256(cal)
    assert info["command"] == "test" and info["text"]["tokens"]["train"] > 0
    ev = np.load(tmp_path / "tokens" / rr.EVAL_FILE)
    assert ev.shape == (c.eval.num_sequences, c.eval.seq_len)

    mcfg, teacher_params = RunContext(c, workdir).teacher
    release = write_release_dir(
        tmp_path / "rel", mcfg, release_tensors(mcfg, teacher_params, keep=(1,)), keep=(1,)
    )
    result = rr.evaluate(c, workdir, tokens_dir, [("uniform", release)] * 2, 0.5, as_saved=True)
    assert [(r["strategy"], r["release_run"]) for r in result["rows"]] == [
        ("reference_release", 0),
        ("reference_release+as_saved", 0),
        ("reference_release", 1),
        ("reference_release+as_saved", 1),
    ]
    assert result["eval_sha256"] == info["eval"]["sha256"]
    sc, params = load_student(result["imports"][1]["student_dir"])
    assert sc.keep_full_attention_layers == (1,)
    again = perplexity(sc.model(), params, ev, batch_size=c.eval.batch_size)
    assert result["rows"][0]["ppl"] == pytest.approx(again["ppl"], rel=1e-6)
    assert result["rows"][2]["ppl"] == result["rows"][0]["ppl"]
    assert result["rows"][1]["ppl"] == pytest.approx(result["rows"][0]["ppl"], rel=0.05)
    sweep = {"eval_tokens": result["eval_tokens"], "teacher_ppl": 2 * result["teacher_ppl"]}
    with pytest.raises(ValueError, match="not the same tokens"):
        rr.evaluate(c, workdir, tokens_dir, [("uniform", release)], 0.5, sweeps=[sweep])


def test_sweep_rows_only_from_the_same_tokens():
    rows = [
        {"policy": "uniform", "kept_fraction": 0.25, "strategy": "copy", "ppl": 9.0},
        {"policy": "ar", "kept_fraction": 0.25, "strategy": "copy", "ppl": 8.0},
        {"policy": "uniform", "kept_fraction": 0.5, "strategy": "copy", "ppl": 7.0},
    ]
    sweep = {"eval_tokens": 100, "teacher_ppl": 5.0, "rows": rows}
    assert rr.sweep_rows(sweep, 5.0, 100, 0.25, ["uniform"]) == rows[:1]
    with pytest.raises(ValueError, match="not the same tokens"):
        rr.sweep_rows(sweep, 5.01, 100, 0.25, ["uniform"])
    with pytest.raises(ValueError, match="tokens"):
        rr.sweep_rows(sweep, 5.0, 99, 0.25, ["uniform"])


def test_release_is_given_the_keep_from_strategys_layers():
    KEEP_FROM = "taylor_calibrate"
    rows = [
        {"policy": "ga_s2", "kept_fraction": f, "strategy": s, "keep_full_attention_layers": k}
        for f, s, k in ((0.25, "copy", [1]), (0.25, KEEP_FROM, [2]), (0.5, KEEP_FROM, [2, 3]))
    ]
    assert rr.sweep_keep(rows, "ga_s2", 0.25, KEEP_FROM) == (2,)
    assert rr.sweep_keep(rows, "ga_s2", 0.5, KEEP_FROM) == (2, 3)
    assert rr.sweep_keep(rows, "uniform", 0.25, KEEP_FROM) is None
    import yaml

    cfg = yaml.safe_load(rr.release_yaml("/t/fla", (0, 3), "/o"))
    assert cfg == {
        "teacher_model": {"name": "/t/fla"},
        "student_model": {"name": "gdn_v4", "keep_full_attention_layers": [0, 3]},
        "train": {"output_dir": "/o"},
    }


# Stand-ins for the release's two scripts (the release itself needs its checkout and fla, which
# are not part of this repository): they check the arguments `run` gives them as the real ones
# read them, and write what the real ones write (the converter a directory, the init a student
# dir: a prepared release student of the smoke teacher).
_CONVERTER = """
import argparse, json, os
p = argparse.ArgumentParser(); p.add_argument("--model"); p.add_argument("--config")
p.add_argument("--output"); a = p.parse_args()
assert os.path.exists(os.path.join(a.model, "config.json")) and a.config == "smollm2-135m"
os.makedirs(a.output); json.dump({"converted_from": a.model}, open(a.output + "/config.json", "w"))
print("converted", flush=True)
"""
_INIT = """
import argparse, os, shutil, numpy as np, yaml
p = argparse.ArgumentParser()
for f in ("--cfg", "--strategy", "--hf-teacher", "--output"): p.add_argument(f)
a = p.parse_args(); cfg = yaml.safe_load(open(a.cfg))
assert a.strategy == "taylor_calibrate" and cfg["student_model"]["name"] == "gdn_v4"
assert os.path.exists(os.path.join(cfg["teacher_model"]["name"], "config.json"))
assert np.load(os.environ["CALIBRATION_TOKENS_NPY"]).ndim == 2
keep = cfg["student_model"]["keep_full_attention_layers"]
shutil.copytree(os.path.join(os.path.dirname(__file__), "prepared", str(keep)), a.output)
print("Layer 1 FINAL: loss=0.5", flush=True)
"""


def test_run_adds_release_rows_to_the_sweep_and_resumes(smoke_run, tmp_path, capsys):
    import sweep_zero_shot

    from taylorcal_jax.calibrate import select
    from taylorcal_jax.run.context import RunContext

    c, workdir = smoke_run
    mcfg, teacher_params = RunContext(c, workdir).teacher
    n = mcfg.num_hidden_layers
    code = tmp_path / "release"
    (code / "convert").mkdir(parents=True)
    (code / "src").mkdir()
    (code / rr.RELEASE_CONVERTER).write_text(_CONVERTER)
    (code / rr.RELEASE_INIT).write_text(_INIT)
    keeps = {"uniform": select.uniform_layers(n, 0.5), "ar": (0,)}
    for keep in keeps.values():
        tensors = release_tensors(mcfg, teacher_params, keep=keep)
        write_release_dir(code / "src" / "prepared" / str(list(keep)), mcfg, tensors, keep=keep)

    teacher = rr.teacher_perplexity(rr.load_run(c, workdir))
    sweep = {
        "teacher": "smoke", "teacher_name": "smoke", "teacher_ppl": teacher["ppl"],
        "eval_tokens": teacher["tokens"], "eval_split": c.eval.split, "eval_seq_len": 8,
        "device": "cpu", "date": "today", "command": "sweep", "per_strategy": {},
        "rows": [
            {"policy": p, "kept_fraction": 0.5, "strategy": s, "keep_full_attention_layers": k,
             "ppl": 9.0}
            for p, k in keeps.items() for s in ("copy", rr.KEEP_FROM)
        ],
    }  # fmt: skip
    out = tmp_path / "results"
    out.mkdir()
    path = str(out / "zero_shot_smoke.json")
    with open(path, "w") as f:
        json.dump(sweep, f)

    got = rr.add_release_rows(c, workdir, str(code), path, ["uniform", "ar"], fraction=0.5)
    printed = capsys.readouterr().out
    assert "[release] converted" in printed and "[release] Layer 1 FINAL" in printed
    on_disk = json.load(open(path))
    assert on_disk["rows"] == got["rows"]
    release_rows = [r for r in got["rows"] if r["strategy"] == rr.STRATEGY]
    assert [r["policy"] for r in release_rows] == ["uniform", "ar"]
    for r in release_rows:
        assert tuple(r["keep_full_attention_layers"]) == keeps[r["policy"]]
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1
    assert "| reference_release |" in (out / "zero_shot_smoke.md").read_text()
    assert got["reference_release"]["code"]["py_sha256"]
    again = dict(sweep, rows=sweep["rows"] + [dict(release_rows[0], ppl=1.0)])
    with open(path, "w") as f:  # a rerun: the release's outputs are reused, rows replaced
        json.dump(again, f)
    (code / rr.RELEASE_INIT).write_text("raise SystemExit('must not run again')")
    rerun = rr.add_release_rows(c, workdir, str(code), path, ["uniform"], fraction=0.5)
    uniform = [r for r in rerun["rows"] if r["strategy"] == rr.STRATEGY]
    assert uniform == [release_rows[0]]
    assert sweep_zero_shot.markdown_table(rerun).count("| reference_release |") == 1
    only_ar = rr.add_release_rows(c, workdir, str(code), path, ["ar"], fraction=0.5)
    assert [r["policy"] for r in only_ar["reference_release"]["imports"]] == ["uniform", "ar"]
    imports = only_ar["reference_release"]["imports"]
    assert all(set(rr.IMPORT_PROVENANCE) <= set(r) for r in imports)
    table = sweep_zero_shot.markdown_table(only_ar)
    assert all(f"- {r['policy']}: {r['device']}, {r['date']}" in table for r in imports)
    assert [r["policy"] for r in only_ar["rows"] if r["strategy"] == rr.STRATEGY] == [
        "uniform",
        "ar",
    ]  # a run for some policies keeps the others' rows and import records
    with pytest.raises(ValueError, match="ga_s2"):
        rr.add_release_rows(c, workdir, str(code), path, ["ga_s2"], fraction=0.5)
