"""Shared settings for calibrating a real Hugging Face teacher from a local checkpoint dir.

Not a runnable config by itself; configs/qwen2_5_1_5b.py, qwen2_5_3b.py, llama3_2_3b.py and
qwen3_8b.py build on `real_teacher_config`. The checkpoint is read from `teacher.path` (the
config arg, e.g. `configs/qwen2_5_1_5b.py:/models/Qwen2.5-1.5B`); its own tokenizer is used.
Text: Wikitext-2 (raw) through `datasets` (needs a local cache on machines without network;
`--config.data.source=files:<glob>` or `stdlib` work anywhere). Documents are split by the
project's hashed split, not by the dataset's official splits. Zero-shot perplexity at 2048
tokens as in the release; calibration on 4 x 256 train tokens (the release used the test
split; we keep test text out of calibration).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

STAGES = ("eval_teacher", "statistics", "calibrate", "align", "select_layers", "eval_student")


def real_teacher_config(default_path: str, arg: str | None):
    """Common config with teacher.path = arg (or default_path) and the paper's settings."""
    c = common.get_config()
    c.stages = STAGES
    c.teacher.path = arg or default_path
    c.data.source = "hf:wikitext:wikitext-2-raw-v1"
    c.data.include_tests = False
    c.eval.split = "test"
    c.eval.num_sequences = 64
    c.eval.seq_len = 2048
    c.eval.batch_size = 2
    c.calibration.num_sequences = 4
    c.calibration.seq_len = 256
    c.calibration.sequences_per_batch = 1
    c.calibration.block_size = 256
    c.calibration.gdn.impl = "auto"
    c.select.policy = "uniform"
    c.select.kept_fraction = 0.25
    c.select.num_sequences = 16
    c.select.seq_len = 512
    c.select.batch_size = 2
    c.select.parallel_candidates = 2
    return c
