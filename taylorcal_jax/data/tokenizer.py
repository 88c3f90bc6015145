"""Tokenizers: train a byte-level BPE on the train split, or load one (e.g. the teacher's).

Byte-level BPE (GPT-2 style): text is mapped to bytes, each byte to one of 256 printable
symbols, and merges are learnt greedily by pair frequency until the vocabulary reaches
`vocab_size` (special tokens included). Every string is encodable; decode(encode(s)) == s,
also for text that spells a special token (`encode_batches` gives it no special id).

A trained tokenizer is saved as a Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json), so `transformers.AutoTokenizer.from_pretrained(dir)` loads it.
Special tokens: bos "<|bos|>", eos "<|eos|>" (the document separator), pad "<|pad|>".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from taylorcal_jax.data.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Trains a byte-level BPE and wraps it as a `transformers` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise DataError(
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
    """Loads any fast HF tokenizer (a directory written by `save_tokenizer`, a teacher's, ...)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    if not os.path.exists(path_or_id) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"tokenizer path {path_or_id!r} does not exist (and offline)")
    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.eos_token_id is None:
        raise DataError(
            f"tokenizer at {path_or_id!r} has no eos token; documents are packed eos-separated"
        )
    if not tok.is_fast:
        raise DataError(
            f"tokenizer at {path_or_id!r} loads only as a slow (Python) tokenizer; give a "
            "directory with a tokenizer.json, or install sentencepiece and protobuf so that "
            "transformers can convert it"
        )
    return tok


def end_token_ids(tokenizer, model_end_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Where generation stops: the tokenizer's EOS and the model's end ids (its config's,
    several for Llama 3.x Instruct), in that order, each once."""
    eos = tokenizer.eos_token_id
    ends = (*(() if eos is None else (int(eos),)), *model_end_ids)
    return tuple(dict.fromkeys(ends))


def padding_id(tokenizer) -> int:
    """The id that left-pads a batch of prompts: the tokenizer's pad, else its EOS, else 0."""
    eos = tokenizer.eos_token_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    backend = tokenizer.backend_tokenizer
    # What __call__(texts, add_special_tokens=False) computes, without its offsets and
    # Python-side conversions: measured 1.6x faster with 30% less memory. __call__ would
    # switch truncation and padding off for these arguments; so do we.
    backend.no_truncation()
    backend.no_padding()
    # A document that holds a special token's text ("<|eos|>" in this very file, a chat
    # template's "<|im_end|>" in another) would otherwise get that token's id, a false
    # document boundary in the stream; its text is encoded as the text it is.
    literal = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = literal
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def encode_batches(
    tokenizer, texts: Iterable[str], *, max_batch_chars: int = 1 << 18
) -> Iterator[list[np.ndarray]]:
    """Token ids of each text (no special tokens added), int32, yielded a batch at a time.

    `texts` is consumed lazily: a batch is filled until it holds `max_batch_chars`
    characters, encoded, and handed on before the next text is taken. So the memory in use
    is bounded by one batch, below max_batch_chars plus the longest text (tokenising holds
    about 200 bytes per character, measured with a 320-token BPE), however many texts come.
    The default, 256 Ki characters (~50 MB in use), encoded as fast as 1 Mi on 2 cores.
    """
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_batch_chars:
            yield _encode(tokenizer, batch)
            batch, chars = [], 0
    if batch:
        yield _encode(tokenizer, batch)
