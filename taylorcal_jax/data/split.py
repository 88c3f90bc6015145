"""Deterministic train/valid/test split by document.

Each document id is hashed (blake2b with the split seed as key) to u in [0, 1);
the document goes to "valid" if u < f_valid, to "test" if f_valid <= u < f_valid + f_test,
and to "train" otherwise. The split of a document never depends on the other documents,
the machine, Python's hash seed, or the order the source listed them in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from taylorcal_jax.data.sources import Document

SPLITS = ("train", "valid", "test")


def unit_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.blake2b(
        doc_id.encode("utf-8"), digest_size=8, key=str(int(seed)).encode()
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"data.{name} must be in [0, 1), got {f}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.valid_fraction + data.test_fraction must be < 1 (leave documents to train on), "
            f"got {valid_fraction} + {test_fraction}"
        )


def split_of(doc_id: str, *, valid_fraction: float, test_fraction: float, seed: int) -> str:
    u = unit_hash(doc_id, seed)
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def split_documents(
    docs: Sequence[Document], *, valid_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """{"train": [...], "valid": [...], "test": [...]}, each keeping the input order."""
    check_fractions(valid_fraction, test_fraction)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        name = split_of(d.id, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed)
        out[name].append(d)
    return out
