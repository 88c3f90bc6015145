"""Deterministic train/valid/test split by document content.

A document's key is k = blake2b(text.strip()) (`content_key`). k is hashed again, keyed by
the split seed, to u in [0, 1); the document goes to "valid" if u < f_valid, to "test" if
f_valid <= u < f_valid + f_test, and to "train" otherwise. Hence:

- the split of a document depends on its text and the seed alone, never on the other
  documents, the machine, Python's hash seed, or the order the source listed them in;
- exact copies (vendored packages, identical `__init__.py` files, repeated dataset rows)
  all land in one split, so no evaluation document is also a training document.
"""

from __future__ import annotations

import hashlib

from taylorcal_jax.data.errors import DataError

SPLITS = ("train", "valid", "test")


def content_key(text: str) -> bytes:
    """16-byte hash of the document's text, ignoring leading and trailing whitespace."""
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


def unit_hash(key: bytes, seed: int) -> float:
    digest = hashlib.blake2b(key, digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"data.{name} must be in [0, 1), got {f}")
    if valid_fraction + test_fraction >= 1.0:
        raise DataError(
            f"data.valid_fraction + data.test_fraction must be < 1 (leave documents to train on), "
            f"got {valid_fraction} + {test_fraction}"
        )


def split_of(key: bytes, *, valid_fraction: float, test_fraction: float, seed: int) -> str:
    """The split of the document whose `content_key` is `key`."""
    u = unit_hash(key, seed)
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"
