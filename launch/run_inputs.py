"""The inputs of a run on a real teacher, resolved and recorded for its result file.

`resolve_teacher(config, workdir)` turns a `.gguf` teacher.path into its converted checkpoint
directory (taylorcal_jax/models/gguf.py, cached in <workdir>/gguf) and returns what the teacher
was made from. `text_record(config, corpus, eval_tokens_nt)` says which text a run read: the
source spec (for `files:`, the glob), the split settings, documents and tokens per split, and
digests, so that two results can be told to rest on the same text or not:

    corpus_digest   sha256 over the train/valid/test token streams (split name, length, int32
                    little-endian bytes): the documents, their split and the tokenizer together
    eval_digest     sha256 of the evaluation sequences [N, T] (int32 little-endian)

Digests are the first 16 hex digits.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np


def tokens_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 (16 hex digits) over (name, shape, int32 LE bytes) of each array, by name."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<i4")
        h.update(f"{name}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def resolve_teacher(config, workdir: str) -> dict:
    """Sets config.teacher.path to a checkpoint directory (converting a .gguf file once) and
    returns {"path", "gguf": the conversion record or None}."""
    from taylorcal_jax.models import gguf

    given = config.teacher.path
    cache_root = os.path.join(workdir, gguf.WORKDIR_CACHE)
    config.teacher.path = gguf.resolve_teacher_dir(given, cache_root)
    record = None
    if config.teacher.path != given:
        with open(os.path.join(config.teacher.path, gguf.RECORD_FILE)) as f:
            record = json.load(f)
    return {"path": given, "checkpoint": config.teacher.path, "gguf": record}


def text_record(config, corpus, eval_tokens_nt) -> dict:
    """Which text the run read (see module docstring)."""
    from taylorcal_jax.data import split

    d, e = config.data, config.eval
    return {
        "source": d.source,
        "max_documents": int(d.max_documents),
        "valid_fraction": float(d.valid_fraction),
        "test_fraction": float(d.test_fraction),
        "split_seed": int(d.split_seed),
        "documents": {s: int(corpus.num_documents[s]) for s in split.SPLITS},
        "tokens": {s: int(corpus.stream(s).size) for s in split.SPLITS},
        "tokenizer": corpus.tokenizer_path,
        "corpus_digest": tokens_digest({s: corpus.stream(s) for s in split.SPLITS}),
        "eval_split": e.split,
        # non-overlapping windows of eval.seq_len the eval split holds (the most one can ask)
        "eval_windows_available": int(corpus.stream(e.split).size // int(e.seq_len)),
        "eval_shape": list(np.shape(eval_tokens_nt)),
        "eval_seed": int(e.seed),
        "eval_digest": tokens_digest({"eval": eval_tokens_nt}),
    }
