"""Tokenizers: train a byte-level BPE on the train split, or load one (e.g. the teacher's).

Byte-level BPE (GPT-2 style): text is mapped to bytes, each byte to one of 256 printable
symbols, and merges are learnt greedily by pair frequency until the vocabulary reaches
`vocab_size` (special tokens included). Every string is encodable; decode(encode(s)) == s.

A trained tokenizer is saved as a Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json), so `transformers.AutoTokenizer.from_pretrained(dir)` loads it.
Special tokens: bos "<|bos|>", eos "<|eos|>" (the document separator), pad "<|pad|>".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Trains a byte-level BPE and wraps it as a `transformers` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"tokenizer.vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path_or_id: str | os.PathLike):
    """Loads any HF tokenizer (a directory written by `save_tokenizer`, a teacher's dir, ...)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    if not os.path.exists(path_or_id) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"tokenizer path {path_or_id!r} does not exist (and offline)")
    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {path_or_id!r} has no eos token; documents are packed eos-separated"
        )
    return tok


def encode_documents(tokenizer, texts: Sequence[str], *, batch_size: int = 256) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), as int32 arrays."""
    from taylorcal_jax.utils.progress import progress  # noqa: PLC0415

    out: list[np.ndarray] = []
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, desc="tokenize", total=len(starts), unit="batch"):
        enc = tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(ids, dtype=np.int32) for ids in enc)
    return out
