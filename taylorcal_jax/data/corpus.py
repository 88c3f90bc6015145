"""The data pipeline end to end: source -> checks -> split -> tokenizer -> eos-packed streams.

`build_corpus(data_cfg, tokenizer_cfg, cache_dir, tokenizer_path=...)` returns a `Corpus`
whose `streams[split]` is the split's int32 token stream (see packing.py), memory-mapped
from the cache. It works in passes that each hold one document, or one tokeniser batch,
at a time, so memory is bounded by those and not by the size of the corpus:

1. read: list the source and read each document with the input checks of reading.py
   until `data.max_documents` are kept; give each kept document its split by content
   hash (split.py) and remember only where it is and its content key. Skipped files and
   replaced bytes are logged as warnings; no document left, or too many bytes that are
   not UTF-8, raise DataError here, before any tokenising.
2. tokenizer: an explicit `tokenizer_path` (the teacher's own tokenizer, or
   `tokenizer_cfg.path`) is loaded with AutoTokenizer; otherwise a byte-level BPE is
   trained on the train split only (read again; at most `data.bpe_sample_bytes` of it,
   see `bpe_sample`) and saved to `<cache_dir>/tokenizer`.
3. tokenise: each split's documents are read again, encoded in batches and appended to
   `<split>.int32` (little-endian int32; each document followed by eos).

A document whose text changed between passes raises DataError (no mixed versions).
Cache: `<cache_dir>/tokens-<key>/` holds {train,valid,test}.int32, num_documents.json,
input_report.json and key.json, where the key hashes what they depend on (cache format,
source and what it resolves to here, checks, split settings, tokenizer contents and eos id);
so reruns skip all three passes, a changed setting never reuses stale tokens, and a cache of
an older format has another key and is rebuilt, never misread. The key does not cover the
contents of the source: after editing its files, delete `<cache_dir>`. The directory is
written as a temporary `tokens-<key>.<pid>.partial` and renamed when complete, so an
interrupted build leaves nothing that could pass for a corpus; one build per cache directory
at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np

from taylorcal_jax.data import packing, reading, sources, split
from taylorcal_jax.data import tokenizer as tok_lib
from taylorcal_jax.data.errors import DataError
from taylorcal_jax.utils import files
from taylorcal_jax.utils.progress import progress

# 1: .npy streams, id-hashed split. 2: raw int32 streams, content-hashed split, input checks.
# 3: a special token's text inside a document is encoded as plain text (tokenizer._encode).
TOKEN_FORMAT = 3
_STREAM_DTYPE = np.dtype("<i4")
_TOKENIZER_META = "taylorcal_tokenizer_meta.json"

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    tokenizer_path: str
    streams: dict[str, np.ndarray]
    num_documents: dict[str, int]
    report: dict  # reading.InputReport as a dict: kept and skipped files, undecodable bytes

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


def check_data_config(data_cfg) -> reading.ReadLimits:
    """Raises DataError for a bad value in the data section; returns its read limits."""
    sources.parse_source(data_cfg.source)
    split.check_fractions(data_cfg.valid_fraction, data_cfg.test_fraction)
    for name in ("max_documents", "bpe_sample_bytes"):
        n = data_cfg[name]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"data.{name} must be an integer >= 0 (0 = all), got {n!r}")
    return reading.ReadLimits.from_config(data_cfg)


@dataclasses.dataclass(frozen=True)
class KeptDocument:
    """A document that passed the checks: how to read it again, its content key and size."""

    entry: sources.Entry
    key: bytes
    num_bytes: int


def _read_source(data_cfg, limits: reading.ReadLimits):
    """Pass 1: ({split: [KeptDocument] in id order}, reading.InputReport)."""
    entries = sources.list_entries(data_cfg.source, include_tests=data_cfg.include_tests)
    report = reading.InputReport()
    parts: dict[str, list[KeptDocument]] = {s: [] for s in split.SPLITS}
    for entry in progress(entries, desc="read documents", unit="file"):
        result = reading.read_entry(entry, limits.max_file_bytes)
        report.add(entry.id, result)
        if result.status != "text":
            continue
        key = split.content_key(result.text)
        name = split.split_of(
            key,
            valid_fraction=data_cfg.valid_fraction,
            test_fraction=data_cfg.test_fraction,
            seed=data_cfg.split_seed,
        )
        parts[name].append(KeptDocument(entry, key, result.num_bytes))
        if data_cfg.max_documents and report.documents >= data_cfg.max_documents:
            break
    report.check(limits, data_cfg.source)
    for line in report.warnings(limits):
        logger.warning("data.source %r: %s", data_cfg.source, line)
    if not parts["train"]:
        raise DataError(
            f"source {data_cfg.source!r}: none of its {report.documents} documents fell in "
            "the train split; use more documents or smaller data.valid_fraction/test_fraction"
        )
    return parts, report


def _reread(kept: list[KeptDocument], limits: reading.ReadLimits) -> Iterator[str]:
    """The texts of `kept`, read again one at a time."""
    for k in kept:
        result = reading.read_entry(k.entry, limits.max_file_bytes)
        if result.status != "text" or split.content_key(result.text) != k.key:
            raise DataError(
                f"document {k.entry.id!r} changed while the corpus was being built; run again"
            )
        yield result.text


def bpe_sample(train: list[KeptDocument], budget: int) -> list[KeptDocument]:
    """The train documents a BPE learns from: all if their bytes fit in `budget` (or it is 0);
    else those that fit, taken in content-key order (a fixed pseudo-random order), skipping
    any that would overflow it; DataError if none fits.

    BPE training holds every distinct word of its input with a count, so its memory and
    time grow with the text; the merges of a small vocabulary are settled by far less.
    """
    if not budget or sum(k.num_bytes for k in train) <= budget:
        return train
    sample, total = [], 0
    for k in sorted(train, key=lambda k: k.key):
        if total + k.num_bytes <= budget:
            sample.append(k)
            total += k.num_bytes
    if not sample:
        smallest = min(k.num_bytes for k in train)
        raise DataError(
            f"data.bpe_sample_bytes={budget} is below the smallest train document "
            f"({smallest} bytes), so the BPE would learn from no text",
            "raise data.bpe_sample_bytes (0: all of the train split)",
        )
    return sample


def _data_key(data_cfg) -> dict:
    return {
        "format": TOKEN_FORMAT,
        "source": data_cfg.source,
        "resolved_source": sources.resolved_source(data_cfg.source),
        "include_tests": bool(data_cfg.include_tests),
        "max_documents": int(data_cfg.max_documents),
        "max_file_bytes": int(data_cfg.max_file_bytes),
        "valid_fraction": float(data_cfg.valid_fraction),
        "test_fraction": float(data_cfg.test_fraction),
        "split_seed": int(data_cfg.split_seed),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's model and the separator id the streams use: which token is eos is set
    in tokenizer_config.json, outside the model (a base model and its instruct version often
    share the one and not the other)."""
    text = tokenizer.backend_tokenizer.to_str() + f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _trained_tokenizer(read: Callable, tokenizer_cfg, data_cfg, limits, out_dir: str):
    """Loads the BPE in `out_dir` if it was trained with these settings, else trains it."""
    meta = {
        "vocab_size": int(tokenizer_cfg.vocab_size),
        "min_frequency": int(tokenizer_cfg.min_frequency),
        "data": _data_key(data_cfg),
        "bpe_sample_bytes": int(data_cfg.bpe_sample_bytes),
    }
    meta_path = os.path.join(out_dir, _TOKENIZER_META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return tok_lib.load_tokenizer(out_dir)
        os.remove(meta_path)  # so that a half-written tokenizer never passes for current
    parts, _ = read()
    train = bpe_sample(parts["train"], data_cfg.bpe_sample_bytes)
    texts = progress(
        _reread(train, limits), desc="train BPE on the train split", total=len(train), unit="doc"
    )
    tok = tok_lib.train_bpe(
        texts, tokenizer_cfg.vocab_size, min_frequency=tokenizer_cfg.min_frequency
    )
    tok_lib.save_tokenizer(tok, out_dir)
    files.write_json(meta_path, meta)
    return tok_lib.load_tokenizer(out_dir)


def _stream_path(tok_dir: str, name: str) -> str:
    return os.path.join(tok_dir, f"{name}.int32")


def _write_tokens(tok_dir: str, parts, report, tokenizer, limits, key: dict) -> None:
    """Pass 3: tokenises every split into `tok_dir`, all or nothing."""
    partial = files.temporary_name(tok_dir)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        for name in split.SPLITS:
            kept = parts[name]
            texts = progress(
                _reread(kept, limits), desc=f"tokenize {name}", total=len(kept), unit="doc"
            )
            with open(_stream_path(partial, name), "wb") as f:
                for ids in tok_lib.encode_batches(tokenizer, texts):
                    stream = packing.concat_with_eos(ids, tokenizer.eos_token_id)
                    stream.astype(_STREAM_DTYPE, copy=False).tofile(f)
        files.write_json(
            os.path.join(partial, "num_documents.json"), {s: len(parts[s]) for s in split.SPLITS}
        )
        files.write_json(os.path.join(partial, "input_report.json"), dataclasses.asdict(report))
        files.write_json(os.path.join(partial, "key.json"), key)
        os.replace(partial, tok_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _load_stream(path: str) -> np.ndarray:
    if os.path.getsize(path) == 0:  # an empty split; mmap cannot map an empty file
        return np.zeros((0,), np.int32)
    return np.memmap(path, dtype=_STREAM_DTYPE, mode="r")


def build_corpus(data_cfg, tokenizer_cfg, cache_dir: str, *, tokenizer_path: str = "") -> Corpus:
    """Checks, splits, tokenises (cached) and eos-packs the configured source."""
    limits = check_data_config(data_cfg)
    os.makedirs(cache_dir, exist_ok=True)
    # Pass 1 runs at most once, and only when the tokenizer or the token cache needs it.
    read = functools.cache(lambda: _read_source(data_cfg, limits))
    if tokenizer_path:
        tokenizer = tok_lib.load_tokenizer(tokenizer_path)
    else:
        tokenizer_path = os.path.join(cache_dir, "tokenizer")
        tokenizer = _trained_tokenizer(read, tokenizer_cfg, data_cfg, limits, tokenizer_path)
    key = dict(_data_key(data_cfg), tokenizer=tokenizer_fingerprint(tokenizer))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tok_dir = os.path.join(cache_dir, f"tokens-{digest}")
    if not os.path.isdir(tok_dir):
        parts, report = read()
        _write_tokens(tok_dir, parts, report, tokenizer, limits, key)
    with open(os.path.join(tok_dir, "num_documents.json")) as f:
        counts = json.load(f)
    with open(os.path.join(tok_dir, "input_report.json")) as f:
        report = json.load(f)
    # The cache key leaves out the threshold (it changes no token); apply today's value.
    reading.InputReport(**report).check(limits, data_cfg.source)
    streams = {s: _load_stream(_stream_path(tok_dir, s)) for s in split.SPLITS}
    return Corpus(tokenizer, str(tokenizer_path), streams, counts, report)
