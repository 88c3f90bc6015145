"""launch/sweep_zero_shot.py: the runs each strategy expands to, and the written tables."""

import json
import os
import subprocess
import sys

import sweep_zero_shot  # launch/
from suite_env import suite_xla_flags

from taylorcal_jax.calibrate.taylor import PHASE1_PARTS


def test_naive_strategies_run_once_whatever_the_options():
    for strategy in ("copy", "zero_gate", "align_only"):
        assert sweep_zero_shot.variants(strategy, ["release", "mean_direction"], True) == [
            (strategy, {})
        ]


def test_phase1_ablation_adds_each_part_alone_and_all_but_each():
    runs = dict(sweep_zero_shot.variants("taylor_calibrate", ["release", "mean_direction"], True))
    assert runs.pop("taylor_calibrate") == {"write_gate": "release"}
    assert runs.pop("taylor_calibrate+mean_direction") == {"write_gate": "mean_direction"}
    assert len(runs) == 2 * len(PHASE1_PARTS)
    for part in PHASE1_PARTS:
        alone = runs[f"taylor_calibrate[{part}]"]
        assert alone == {"write_gate": "release", "phase1_parts": (part,)}
        all_but = runs[f"taylor_calibrate[-{part}]"]["phase1_parts"]
        assert set(all_but) == set(PHASE1_PARTS) - {part}
    chosen = sweep_zero_shot.variants("taylor_calibrate", ["release"], False, ["decay+write_gate"])
    assert chosen[1] == (
        "taylor_calibrate[decay+write_gate]",
        {"write_gate": "release", "phase1_parts": ("decay", "write_gate")},
    )
    three = ("decay", "write_gate", "output_gate")
    assert sweep_zero_shot.ablation_label("t", three) == "t[-value_scale]"
    plain = sweep_zero_shot.variants("taylor_init", ["release"], False)
    assert plain == [("taylor_init", {"write_gate": "release"})]


def test_tables_show_the_text_and_the_alignment_losses(tmp_path):
    result = {
        "teacher": "/m/model.gguf",
        "teacher_name": "m",
        "teacher_ppl": 5.0,
        "eval_tokens": 4094,
        "eval_split": "test",
        "eval_seq_len": 2048,
        "device": "cpu",
        "date": "2026-12-04",
        "command": "python3 launch/sweep_zero_shot.py",
        "text": {
            "source": "files:/sp/**/*.py",
            "max_documents": 10,
            "split_seed": 0,
            "documents": {"train": 8, "valid": 1, "test": 1},
            "tokens": {"train": 80, "valid": 10, "test": 10},
            "corpus_digest": "c0ffee",
            "eval_digest": "beef",
        },
        "complete": False,
        "per_strategy": {
            "copy": {"init_seconds": 1.0},
            "taylor_calibrate[-decay]": {
                "phase1_parts": ["write_gate", "value_scale", "output_gate"],
                "align_loss_before": [1.0, 3.0],
                "align_loss_after": [0.5, 1.5],
            },
        },
        "rows": [
            {
                "policy": "uniform",
                "kept_fraction": 0.25,
                "strategy": s,
                "keep_full_attention_layers": [0],
                "ppl": p,
            }
            for s, p in (("copy", 100.0), ("taylor_calibrate[-decay]", 20.0))
        ],
    }
    md = sweep_zero_shot.markdown_table(result)
    assert "`files:/sp/**/*.py`" in md and "corpus digest c0ffee" in md
    assert "**Incomplete**" in md
    assert "| taylor_calibrate[-decay] | write_gate value_scale output_gate | 2 | 1 | 1.5 |" in md
    assert "| taylor_calibrate[-decay] | 20.000 |" in md
    paths = sweep_zero_shot.write_outputs(result, str(tmp_path), "m")
    assert json.load(open(paths["json"]))["rows"] == result["rows"]


def test_the_command_ends_a_missing_teacher_in_error_and_hint_lines(tmp_path):
    cmd = [
        sys.executable, "launch/sweep_zero_shot.py", "--config=configs/tiny.py:smoke",
        f"--workdir={tmp_path / 'wd'}", f"--out={tmp_path}", "--config.teacher.path=/nonexistent",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=suite_xla_flags())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "error: teacher.path='/nonexistent' does not exist",
        "hint: set teacher.path to a Hugging Face checkpoint directory (config.json + "
        "*.safetensors) or a .gguf file",
    ], proc.stderr
    assert not (tmp_path / "wd").exists()
