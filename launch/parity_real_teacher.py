"""Parity of our teacher with transformers on a real pretrained model, fp32 logits.

    python launch/parity_real_teacher.py --config=configs/smollm2_135m.py --workdir=/tmp/smollm2

The teacher (`config.teacher.path`; a .gguf is converted once into <workdir>/gguf) is run by
our loader + Flax Transformer and by transformers' PyTorch model (eager attention, float32,
on the CPU) on `--num_sequences` x `--seq_len` tokens of the config's evaluation split. Our
side runs with float32 matmuls (`jax.default_matmul_precision("float32")`), so the figure is
the same on a GPU. Reported (fp32 logits [N, T, V], b = transformers):

    rel_err         max|ours - b| / max|b|   (must be < --tolerance, default 1e-4)
    max_abs_err     max|ours - b|
    top1_agreement  fraction of positions whose argmax agrees
    ppl_ours, ppl_transformers   next-token perplexity of each on these tokens

Writes <out>/parity_<name>.json with device, versions, date, command, the teacher file's
fingerprint and the text record (launch/run_inputs.py); exits 1 when rel_err >= tolerance.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined by the script only, so that tests can import it)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
    flags.DEFINE_string("workdir", None, "Workdir: the converted teacher and corpus cache.")
    flags.DEFINE_string("name", "smollm2_135m", "Result file: <out>/parity_<name>.json.")
    flags.DEFINE_integer("num_sequences", 1, "Sequences of the evaluation split compared.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
    flags.DEFINE_float("tolerance", 1e-4, "Largest accepted rel_err.")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")
    flags.mark_flags_as_required(["config", "workdir"])


VERSIONED = ("jax", "jaxlib", "transformers", "torch", "gguf", "accelerate", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _next_token_nll(logits_tv, tokens_t):
    """Summed next-token NLL of one sequence (float64)."""
    import numpy as np

    x = logits_tv[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, tokens_t[1:, None], -1).sum())


def compare(checkpoint_dir: str, tokens_nt) -> dict:
    """Our fp32 logits against transformers' on `tokens_nt` [N, T] (see module docstring),
    one sequence at a time (only per-sequence summaries are kept)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from taylorcal_jax.models.hf_io import load_pretrained
    from taylorcal_jax.models.teacher import Transformer

    tokens = np.asarray(tokens_nt, np.int64)
    ref_model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config, params = load_pretrained(checkpoint_dir, dtype=jnp.float32)
    fn = jax.jit(lambda p, x: Transformer(config).apply({"params": p}, x)[0])
    max_err = max_ref = nll_ours = nll_ref = 0.0
    agree = 0
    seconds = {"transformers": 0.0, "ours": 0.0}
    for row in tokens:
        t0 = time.perf_counter()
        with torch.no_grad():
            b = ref_model(torch.as_tensor(row[None])).logits[0].float().numpy()
        t1 = time.perf_counter()
        with jax.default_matmul_precision("float32"):
            a = np.asarray(fn(params, jnp.asarray(row[None], jnp.int32))[0])
        t2 = time.perf_counter()
        seconds["transformers"] += t1 - t0
        seconds["ours"] += t2 - t1
        max_err = max(max_err, float(np.max(np.abs(a.astype(np.float64) - b))))
        max_ref = max(max_ref, float(np.max(np.abs(b))))
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        nll_ours += _next_token_nll(a, row)
        nll_ref += _next_token_nll(b, row)
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return {
        "rel_err": max_err / max_ref,
        "max_abs_err": max_err,
        "max_abs_logit": max_ref,
        "top1_agreement": agree / tokens.size,
        "ppl_ours": float(np.exp(nll_ours / predicted)),
        "ppl_transformers": float(np.exp(nll_ref / predicted)),
        "tokens": int(tokens.size),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},  # incl. our compile
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import run_inputs  # launch/ is on sys.path when this script runs
    from results_io import provenance

    from taylorcal_jax.run import validate
    from taylorcal_jax.run.context import RunContext
    from taylorcal_jax.stage_registry import STAGES

    config, workdir = FLAGS.config, FLAGS.workdir
    config.eval.num_sequences, config.eval.seq_len = FLAGS.num_sequences, FLAGS.seq_len
    validate.validate(config, STAGES, workdir)
    t0 = time.perf_counter()
    teacher = run_inputs.resolve_teacher(config, workdir)
    ctx = RunContext(config, workdir)
    corpus = ctx.corpus
    tokens = ctx.sequences(config.eval)
    print(f"text ready ({time.perf_counter() - t0:.0f} s); comparing {tokens.shape}", flush=True)
    result = {
        **provenance(),
        "versions": versions(),
        "teacher": teacher,
        "text": run_inputs.text_record(config, corpus, tokens),
        "tolerance": FLAGS.tolerance,
        **compare(config.teacher.path, tokens),
    }
    result["passed"] = result["rel_err"] < FLAGS.tolerance
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, f"parity_{FLAGS.name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    keys = ("rel_err", "max_abs_err", "top1_agreement", "ppl_ours", "ppl_transformers", "tokens")
    print(json.dumps({k: result[k] for k in keys}))
    print(f"wrote {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    define_flags()
    app.run(main)
