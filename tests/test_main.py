"""The CLI: a smoke run writes config/metrics/summary; bad configs fail early and clearly."""

import json
import os
import subprocess
import sys

import pytest

from taylorcal_jax import main as main_lib
from taylorcal_jax.utils.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


def test_cli_smoke_run_writes_config_metrics_summary(tmp_path):
    workdir = str(tmp_path / "wd")
    cmd = [
        sys.executable,
        "-m",
        "taylorcal_jax.main",
        "--config=configs/tiny.py:smoke",
        f"--workdir={workdir}",
        "--config.pretrain.steps=4",
        "--config.data.max_documents=30",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        resolved = json.load(f)
    assert resolved["pretrain"]["steps"] == 4 and resolved["data"]["max_documents"] == 30
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    stages_done = [r["stage"] for r in records if r.get("done")]
    # configs/tiny.py runs the whole pipeline, teacher to evaluated student.
    assert stages_done == [
        "pretrain",
        "eval_teacher",
        "statistics",
        "calibrate",
        "align",
        "select_layers",
        "eval_student",
    ]
    final = [r for r in records if r["stage"] == "pretrain" and "valid_ppl" in r][-1]
    evaluated = [r for r in records if r["stage"] == "eval_teacher" and "valid_ppl" in r][0]
    # eval_teacher reloads the saved HF teacher; the same sequences give the same perplexity.
    assert abs(evaluated["valid_ppl"] - final["valid_ppl"]) / final["valid_ppl"] < 1e-5
    assert final["tokens"] == 4 * 4 * 32
    with open(os.path.join(workdir, "summary.md")) as f:
        summary = f.read()
    assert "## pretrain" in summary and "## eval_teacher" in summary and "unigram_ppl" in summary
    assert "--config.pretrain.steps=4" in summary
    assert os.path.exists(os.path.join(workdir, "teacher", "model.safetensors"))
    assert "## eval_student" in summary and "student_ppl" in summary
    assert os.path.exists(os.path.join(workdir, "student", "student_config.json"))
    assert os.path.exists(os.path.join(workdir, "calibration_report.png"))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("pretrain.steps", -5, "steps must be positive"),
        ("pretrain.seq_len", 4096, "max_position_embeddings"),
        ("data.source", "s3://bucket", "unknown data source"),
        ("data.valid_fraction", 0.95, "fraction"),
        ("eval.split", "dev", "eval.split"),
        ("stages", ("pretrain", "nope"), "unknown stages"),
    ],
)
def test_bad_config_values_fail_before_any_work(tmp_path, key, value, match):
    config = tiny.get_config("smoke")
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=match):
        main_lib.run(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


def test_every_config_docstring_holds_its_command():
    for name in ("tiny.py", "gpu_teacher.py"):
        path = os.path.join(ROOT, "configs", name)
        with open(path) as f:
            text = f.read()
        assert f"python -m taylorcal_jax.main --config=configs/{name}" in text
