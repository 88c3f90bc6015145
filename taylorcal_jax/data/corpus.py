"""The data pipeline end to end: source -> split -> tokenizer -> eos-packed token streams.

`build_corpus(data_cfg, tokenizer_cfg, cache_dir, tokenizer_path=...)` returns a `Corpus`
whose `streams[split]` is the split's int32 token stream (see packing.py). Tokenised
splits are cached as `<cache_dir>/tokens-<key>/<split>.npy`, where the key hashes
everything they depend on (source, split settings, tokenizer contents), so reruns
are fast and a changed setting never reuses stale tokens.

Tokenizer resolution: an explicit `tokenizer_path` (the teacher's own tokenizer, or
`tokenizer_cfg.path`) is loaded with AutoTokenizer; otherwise a byte-level BPE is
trained on the train split only and saved to `<cache_dir>/tokenizer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from taylorcal_jax.data import packing, sources, split
from taylorcal_jax.data import tokenizer as tok_lib

_TOKENIZER_META = "taylorcal_tokenizer_meta.json"


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    tokenizer_path: str
    streams: dict[str, np.ndarray]
    num_documents: dict[str, int]

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def stream(self, name: str) -> np.ndarray:
        if name not in self.streams:
            raise ValueError(f"unknown split {name!r}; choose one of {sorted(self.streams)}")
        return self.streams[name]

    def sample(self, name: str, num: int, seq_len: int, seed: int) -> np.ndarray:
        return packing.sample_sequences(self.stream(name), num, seq_len, seed)


def _split_documents(data_cfg) -> dict[str, list[sources.Document]]:
    docs = sources.load_documents(data_cfg.source, include_tests=data_cfg.include_tests)
    if data_cfg.max_documents < 0:
        raise ValueError(f"data.max_documents must be >= 0 (0 = all), got {data_cfg.max_documents}")
    if data_cfg.max_documents:
        docs = docs[: data_cfg.max_documents]
    parts = split.split_documents(
        docs,
        valid_fraction=data_cfg.valid_fraction,
        test_fraction=data_cfg.test_fraction,
        seed=data_cfg.split_seed,
    )
    if not parts["train"]:
        raise ValueError(f"source {data_cfg.source!r}: the train split has no documents")
    return parts


def _data_key(data_cfg) -> dict:
    return {
        "source": data_cfg.source,
        "include_tests": bool(data_cfg.include_tests),
        "max_documents": int(data_cfg.max_documents),
        "valid_fraction": float(data_cfg.valid_fraction),
        "test_fraction": float(data_cfg.test_fraction),
        "split_seed": int(data_cfg.split_seed),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _trained_tokenizer(train_docs, tokenizer_cfg, data_cfg, out_dir: str):
    """Loads the BPE in `out_dir` if it was trained with these settings, else trains it."""
    meta = {
        "vocab_size": int(tokenizer_cfg.vocab_size),
        "min_frequency": int(tokenizer_cfg.min_frequency),
        "data": _data_key(data_cfg),
    }
    meta_path = os.path.join(out_dir, _TOKENIZER_META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return tok_lib.load_tokenizer(out_dir)
    tok = tok_lib.train_bpe(
        (d.text for d in train_docs),
        tokenizer_cfg.vocab_size,
        min_frequency=tokenizer_cfg.min_frequency,
    )
    tok_lib.save_tokenizer(tok, out_dir)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return tok_lib.load_tokenizer(out_dir)


def build_corpus(data_cfg, tokenizer_cfg, cache_dir: str, *, tokenizer_path: str = "") -> Corpus:
    """Splits, tokenises (cached) and eos-packs the configured source."""
    os.makedirs(cache_dir, exist_ok=True)
    parts = None
    if tokenizer_path:
        tokenizer = tok_lib.load_tokenizer(tokenizer_path)
    else:
        tokenizer_path = os.path.join(cache_dir, "tokenizer")
        parts = _split_documents(data_cfg)
        tokenizer = _trained_tokenizer(parts["train"], tokenizer_cfg, data_cfg, tokenizer_path)
    key = dict(_data_key(data_cfg), tokenizer=tokenizer_fingerprint(tokenizer))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tok_dir = os.path.join(cache_dir, f"tokens-{digest}")
    files = {s: os.path.join(tok_dir, f"{s}.npy") for s in split.SPLITS}
    counts_path = os.path.join(tok_dir, "num_documents.json")
    if all(os.path.exists(p) for p in files.values()) and os.path.exists(counts_path):
        streams = {s: np.load(p) for s, p in files.items()}
        with open(counts_path) as f:
            counts = json.load(f)
        return Corpus(tokenizer, str(tokenizer_path), streams, counts)
    parts = parts or _split_documents(data_cfg)
    streams, counts = {}, {}
    for s in split.SPLITS:
        ids = tok_lib.encode_documents(tokenizer, [d.text for d in parts[s]])
        streams[s] = packing.concat_with_eos(ids, tokenizer.eos_token_id)
        counts[s] = len(parts[s])
    os.makedirs(tok_dir, exist_ok=True)
    for s, p in files.items():
        np.save(p + ".tmp.npy", streams[s])
        os.replace(p + ".tmp.npy", p)
    with open(os.path.join(tok_dir, "key.json"), "w") as f:
        json.dump(key, f, indent=1)
    with open(counts_path, "w") as f:
        json.dump(counts, f)
    return Corpus(tokenizer, str(tokenizer_path), streams, counts)
