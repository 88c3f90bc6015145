"""Packing token streams into fixed-length sequences, and seeded sampling of them.

A split is one int32 stream: doc_1 <eos> doc_2 <eos> ... (documents in id order).
With S stream tokens and length T there are W = floor(S / T) non-overlapping windows
row_w = stream[w*T : (w+1)*T]. `sample_sequences(stream, N, T, seed)` returns N distinct
windows chosen by a seeded permutation (same seed -> same [N, T] array on any machine).
`train_batch(stream, B, T, seed, step)` draws B windows at uniform random offsets in
[0, S - T], keyed by (seed, step), so step s's batch does not depend on earlier steps
(a resumed run sees exactly the batches an uninterrupted one would).

Letters: N sequences, B batch, T time (sequence length), S stream length, W windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taylorcal_jax.data.errors import DataError


def concat_with_eos(token_lists: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """One int32 stream, each document followed by `eos_id`."""
    if eos_id is None or eos_id < 0:
        raise ValueError(f"eos_id must be a token id, got {eos_id}")
    if not token_lists:
        return np.zeros((0,), np.int32)
    parts = []
    eos = np.asarray([eos_id], np.int32)
    for ids in token_lists:
        parts.append(np.asarray(ids, np.int32))
        parts.append(eos)
    return np.concatenate(parts)


def _check_request(stream: np.ndarray, seq_len: int, what: str) -> None:
    if stream.ndim != 1:
        raise ValueError(f"token stream must be 1-D, got shape {stream.shape}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if stream.size == 0:
        raise DataError(
            f"{what}: the token stream is empty (no documents in this split); use more "
            "documents (data.max_documents, data.source) or a larger split fraction"
        )
    if seq_len > stream.size:
        raise DataError(
            f"{what}: seq_len={seq_len} is longer than the corpus allows ({stream.size} tokens "
            "in this split); use a shorter seq_len or a larger corpus / split fraction"
        )


def num_windows(stream: np.ndarray, seq_len: int) -> int:
    return int(stream.size // seq_len)


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """All W non-overlapping windows, [W, T] int32 (the remainder tokens are dropped)."""
    _check_request(stream, seq_len, "pack")
    w = num_windows(stream, seq_len)
    return np.ascontiguousarray(stream[: w * seq_len].reshape(w, seq_len), dtype=np.int32)


def sample_sequences(stream: np.ndarray, num: int, seq_len: int, seed: int) -> np.ndarray:
    """N distinct packed windows chosen by a seeded permutation, [N, T] int32."""
    _check_request(stream, seq_len, "sample_sequences")
    w = num_windows(stream, seq_len)
    if num <= 0:
        raise ValueError(f"number of sequences must be positive, got {num}")
    if num > w:
        raise DataError(
            f"asked for {num} sequences of length {seq_len} but the split has only {w} "
            f"({stream.size} tokens); ask for fewer or shorter sequences"
        )
    rows = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A17])).permutation(w)
    rows = np.sort(rows[:num])
    return pack(stream, seq_len)[rows]


def train_batch(
    stream: np.ndarray,
    batch: int,
    seq_len: int,
    seed: int,
    step: int,
    start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """[B, T] int32 windows at random offsets, a pure function of (seed, step); with
    start/stop only rows [start, stop) of that batch, built alone."""
    _check_request(stream, seq_len, "train_batch")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), 0x7EA1]))
    starts = rng.integers(0, stream.size - seq_len + 1, size=batch)[start:stop]
    return stream[starts[:, None] + np.arange(seq_len)[None, :]].astype(np.int32)
