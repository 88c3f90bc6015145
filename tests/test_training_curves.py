"""eval/training_curves.py: a run's loss and held-out perplexity per training stage, from its
metrics rows (resumed and rerun stages included), and the plot the runner writes."""

import json
import os

from taylorcal_jax.eval import training_curves


def _rows():
    return [
        {"stage": "pretrain", "start": "run"},
        {"stage": "pretrain", "step": 1, "tokens": 100, "loss": 6.0},
        {"stage": "pretrain", "step": 2, "tokens": 200, "loss": 5.0, "valid_ppl": 150.0},
        {"stage": "pretrain", "done": True, "tokens": 200, "valid_ppl": 150.0},
        {"stage": "align", "step": 1, "loss": 0.3},  # no tokens: not a token-stream stage
        {"stage": "distill", "start": "run"},
        {"stage": "distill", "step": 0, "tokens": 0, "eval_ppl": 400.0},
        {"stage": "distill", "step": 1, "tokens": 64, "loss": 0.5},
        {"stage": "distill", "step": 2, "tokens": 128, "loss": 0.45},
        # interrupted here; resumed from the step-1 checkpoint, which logs step 2 again
        {"stage": "distill", "start": "resume"},
        {"stage": "distill", "step": 2, "tokens": 128, "loss": 0.4},
        {"stage": "distill", "step": 2, "tokens": 128, "eval_ppl": 300.0},
        {"stage": "distill", "done": True},
    ]


def test_curves_per_stage_keep_the_last_row_of_a_repeated_point():
    curves = training_curves.training_curves(_rows())
    assert list(curves) == ["pretrain", "distill"]
    assert curves["pretrain"] == {"loss": [[100, 6.0], [200, 5.0]], "ppl": [[200, 150.0]]}
    assert curves["distill"]["loss"] == [[64, 0.5], [128, 0.4]]
    assert curves["distill"]["ppl"] == [[0, 400.0], [128, 300.0]]


def test_a_stage_run_again_from_scratch_shows_its_latest_run_only():
    rerun = [
        {"stage": "distill", "start": "run"},
        {"stage": "distill", "step": 0, "tokens": 0, "eval_ppl": 390.0},
        {"stage": "distill", "step": 1, "tokens": 64, "loss": 0.7},
    ]
    curves = training_curves.training_curves(_rows() + rerun)
    assert curves["distill"] == {"loss": [[64, 0.7]], "ppl": [[0, 390.0]]}
    # also when the earlier run was interrupted (no closing row) at more tokens
    cut = _rows()[:-1] + [{"stage": "distill", "step": 9, "tokens": 576, "loss": 0.2}]
    assert training_curves.training_curves(cut + rerun)["distill"] == curves["distill"]


def test_write_plot_only_once_a_stage_has_trained(tmp_path):
    assert training_curves.write_plot(str(tmp_path)) is None  # no metrics.jsonl
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"stage": "statistics", "done": True}) + "\n")
    assert training_curves.write_plot(str(tmp_path)) is None
    assert not (tmp_path / training_curves.FILENAME).exists()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    path = training_curves.write_plot(str(tmp_path))
    assert path == str(tmp_path / training_curves.FILENAME)
    assert open(path, "rb").read(4) == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    # during training: not again within the interval, again once it has passed
    os.utime(path, (1_000, 1_000))  # drawn long ago
    assert training_curves.write_plot(str(tmp_path), min_interval_s=60) == path
    assert os.path.getmtime(path) > 1_000
    assert training_curves.write_plot(str(tmp_path), min_interval_s=60) is None
