"""Data pipeline: sources, split, tokenizer, packing, sampling, cached corpus."""

import os
import sys

import numpy as np
import pytest

from taylorcal_jax.data import corpus as corpus_lib
from taylorcal_jax.data import packing, reading, sources, split
from taylorcal_jax.data import tokenizer as tok_lib
from taylorcal_jax.data.errors import DataError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import common  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    print(i * i)\n",
    "# a comment with unicode: héllo wörld ✓\nx = {'k': [1, 2, 3]}\n",
    "while True:\n    break\n",
]


def _write_corpus(root, texts):
    os.makedirs(root, exist_ok=True)
    for i, t in enumerate(texts):
        with open(os.path.join(root, f"doc{i:03d}.py"), "w", encoding="utf-8") as f:
            f.write(t)
    return str(root)


def _read_all(spec):
    """{id: ReadResult} of every entry of a source, with the default limits."""
    limits = reading.ReadLimits.from_config(common.get_config().data)
    return {e.id: reading.read_entry(e, limits.max_file_bytes) for e in sources.list_entries(spec)}


# ------------------------------------------------------------------ sources


@pytest.mark.parametrize("bad", ["", "   ", "s3://bucket/x", "hf:", "hf:a:b:c"])
def test_parse_source_rejects_unknown(bad):
    with pytest.raises(DataError):
        sources.parse_source(bad)


def test_parse_source_kinds():
    assert sources.parse_source("stdlib").kind == "stdlib"
    assert sources.parse_source("hf:wikitext:wikitext-2-raw-v1").args == (
        "wikitext",
        "wikitext-2-raw-v1",
    )
    assert sources.parse_source("files:/a/*.txt,/b").args == ("/a/*.txt", "/b")
    assert sources.parse_source("/a/**/*.py").kind == "files"


def test_stdlib_listing_sorted_and_clean():
    paths = sources.stdlib_paths()
    assert len(paths) > 500 and paths == sorted(paths)
    assert not any("site-packages" in p for p in paths)
    assert all(p.endswith(".py") for p in paths)
    no_tests = sources.stdlib_paths(include_tests=False)
    assert set(no_tests) < set(paths)
    assert not any(p.startswith("test" + os.sep) for p in no_tests)
    entries = sources.list_entries("stdlib", include_tests=False)
    assert [e.id for e in entries] == no_tests


def test_file_source_glob_dir_and_errors(tmp_path):
    root = _write_corpus(tmp_path / "c", TEXTS)
    by_dir = _read_all(root)
    by_glob = _read_all("files:" + os.path.join(root, "*.py"))
    assert list(by_dir) == list(by_glob) == [f"doc{i:03d}.py" for i in range(6)]
    assert by_dir["doc004.py"].text == TEXTS[4] and by_dir["doc004.py"].status == "text"
    with pytest.raises(DataError, match="no files match"):
        sources.list_entries(str(tmp_path / "nothing*.txt"))


def test_hf_source_clear_error_when_unavailable():
    # Without `datasets`, or offline without a cached copy: one DataError saying what to do.
    with pytest.raises(DataError, match="datasets|could not load"):
        sources.list_entries("hf:surely_not_a_local_dataset_xyz")


# ------------------------------------------------------------------ split


def test_split_deterministic_independent_and_proportional():
    keys = [split.content_key(f"x = {i}\n") for i in range(2000)]

    def assign(ks, seed=3):
        return {k: split.split_of(k, valid_fraction=0.1, test_fraction=0.2, seed=seed) for k in ks}

    a = assign(keys)
    assert assign(keys[::-1]) == a  # order does not matter
    assert assign(keys[:100]) == {k: a[k] for k in keys[:100]}  # nor do the other documents
    n = len(keys)
    names = list(a.values())
    assert abs(names.count("valid") / n - 0.1) < 0.03
    assert abs(names.count("test") / n - 0.2) < 0.03
    assert assign(keys, seed=4) != a
    # The key is the text, up to surrounding whitespace.
    assert split.content_key("  x = 1\n\n") == split.content_key("x = 1")
    assert split.content_key("x = 1") != split.content_key("x = 2")


@pytest.mark.parametrize("fv,ft", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_split_bad_fractions(fv, ft):
    with pytest.raises(DataError, match="fraction"):
        split.check_fractions(fv, ft)


# ------------------------------------------------------------------ packing / sampling


def test_concat_and_pack():
    stream = packing.concat_with_eos([np.array([5, 6]), np.array([7]), np.array([8, 9, 10])], 1)
    np.testing.assert_array_equal(stream, [5, 6, 1, 7, 1, 8, 9, 10, 1])
    assert stream.dtype == np.int32
    packed = packing.pack(stream, 4)
    np.testing.assert_array_equal(packed, [[5, 6, 1, 7], [1, 8, 9, 10]])


def test_sample_sequences_seeded_distinct_and_errors():
    stream = np.arange(1000, dtype=np.int32)
    a = packing.sample_sequences(stream, 20, 16, seed=7)
    b = packing.sample_sequences(stream, 20, 16, seed=7)
    c = packing.sample_sequences(stream, 20, 16, seed=8)
    assert a.shape == (20, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 20  # distinct windows
    assert np.all(a[:, 0] % 16 == 0) and np.all(np.diff(a, axis=1) == 1)  # aligned windows
    with pytest.raises(ValueError, match="only 62"):
        packing.sample_sequences(stream, 63, 16, seed=0)
    with pytest.raises(ValueError, match="longer than the corpus allows"):
        packing.sample_sequences(stream, 1, 1001, seed=0)
    with pytest.raises(ValueError, match="empty"):
        packing.sample_sequences(np.zeros((0,), np.int32), 1, 4, seed=0)


def test_train_batch_pure_function_of_seed_and_step():
    stream = np.arange(500, dtype=np.int32)
    a = packing.train_batch(stream, 8, 10, seed=1, step=5)
    np.testing.assert_array_equal(a, packing.train_batch(stream, 8, 10, seed=1, step=5))
    assert not np.array_equal(a, packing.train_batch(stream, 8, 10, seed=1, step=6))
    assert np.all(np.diff(a, axis=1) == 1) and a.max() < 500  # contiguous windows
    with pytest.raises(ValueError, match="longer than the corpus allows"):
        packing.train_batch(stream, 1, 501, seed=0, step=0)


# ------------------------------------------------------------------ tokenizer


def test_bpe_round_trip_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = tok_lib.train_bpe(TEXTS * 20, 300, min_frequency=1)
    tok_lib.save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) <= 300
    assert loaded.convert_ids_to_tokens([0, 1, 2]) == list(tok_lib.SPECIAL_TOKENS)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    for text in TEXTS + ["unseen: λx → ∞ \t\r\n  ", "😀 emoji and bytes"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    short = loaded("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert len(short) < len("def add(a, b):")  # merges were learnt
    with pytest.raises(DataError, match="at least 259"):
        tok_lib.train_bpe(TEXTS, 100)


def test_encode_batches_matches_call_and_streams():
    tok = tok_lib.train_bpe(TEXTS * 20, 300, min_frequency=1)
    texts = [t * (i + 1) for i, t in enumerate(TEXTS * 5)]  # 30 texts, 33 to 1,890 chars
    pulled = []

    def lazily():
        for t in texts:
            pulled.append(t)
            yield t

    budget = 1000
    done = 0
    for batch in tok_lib.encode_batches(tok, lazily(), max_batch_chars=budget):
        # A batch holds at most `budget` characters plus its last text, and the input was
        # read no further than that batch: memory is bounded by one batch.
        assert len(pulled) == done + len(batch)
        chars = [len(t) for t in texts[done : done + len(batch)]]
        assert sum(chars[:-1]) < budget
        for t, ids in zip(texts[done : done + len(batch)], batch, strict=True):
            assert ids.dtype == np.int32
            assert ids.tolist() == tok(t, add_special_tokens=False)["input_ids"]
        done += len(batch)
    assert done == len(texts)


def test_text_that_spells_a_special_token_is_encoded_as_text():
    """A document quoting "<|eos|>" (as tokenizer.py does) gets no separator id inside it."""
    tok = tok_lib.train_bpe(TEXTS * 20, 300, min_frequency=1)
    doc = 'SEP = "<|eos|>"  # the separator\nBOS, PAD = "<|bos|>", "<|pad|>"\n'
    (ids,) = next(tok_lib.encode_batches(tok, [doc]))
    assert not set(ids.tolist()) & {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert tok.decode(ids) == doc
    stream = packing.concat_with_eos([ids], tok.eos_token_id)
    assert int((stream == tok.eos_token_id).sum()) == 1  # the document's own end only
    # the tokenizer itself is left as it was: a prompt's special tokens keep their ids
    assert tok("<|eos|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


# ------------------------------------------------------------------ corpus (cached)


def _cfgs(source, **data):
    """The default data and tokenizer sections with this source and a few overrides."""
    c = common.get_config()
    c.data.source = source
    c.data.valid_fraction = 0.3
    c.data.test_fraction = 0.2
    c.data.update(data)
    c.tokenizer.vocab_size = 300
    c.tokenizer.min_frequency = 1
    return c.data, c.tokenizer


def _documents(corpus, name):
    """The texts of a split's documents, decoded from its eos-separated stream."""
    stream = np.asarray(corpus.streams[name])
    ends = np.flatnonzero(stream == corpus.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [corpus.tokenizer.decode(stream[a:b]) for a, b in zip(starts, ends, strict=True)]


def test_build_corpus_packs_caches_and_rekeys(tmp_path):
    texts = [t * (i + 1) for i, t in enumerate(TEXTS * 4)]
    root = _write_corpus(tmp_path / "src", texts)
    data_cfg, tok_cfg = _cfgs(root)
    cache = str(tmp_path / "cache")
    c1 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert sum(c1.num_documents.values()) == 24 and min(c1.num_documents.values()) > 0
    for s, stream in c1.streams.items():
        assert stream.dtype == np.int32 and stream[-1] == c1.eos_id
        assert int((stream == c1.eos_id).sum()) == c1.num_documents[s]
    # Tokenizer was trained on the train split only and saved as an HF dir.
    assert os.path.exists(os.path.join(cache, "tokenizer", "tokenizer.json"))
    # Each split decodes back to its documents in id order; together, all documents.
    key = {t: split.content_key(t) for t in texts}
    for s in split.SPLITS:
        expected = [
            t
            for t in texts
            if split.split_of(key[t], valid_fraction=0.3, test_fraction=0.2, seed=0) == s
        ]
        assert _documents(c1, s) == expected
    assert c1.report["documents"] == 24 and c1.report["undecodable_bytes"] == 0
    # Second build: loaded from the cache, identical.
    c2 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    for s in split.SPLITS:
        np.testing.assert_array_equal(c1.streams[s], c2.streams[s])
    assert len([d for d in os.listdir(cache) if d.startswith("tokens-")]) == 1
    # A different split seed gives a different cache entry and different streams.
    data_cfg.split_seed = 1
    c3 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert len([d for d in os.listdir(cache) if d.startswith("tokens-")]) == 2
    assert c3.num_documents != c1.num_documents or not np.array_equal(
        c3.streams["valid"], c1.streams["valid"]
    )
    # Seeded sampling through the corpus, and a clear error when asking for too much.
    a = c1.sample("train", 3, 8, seed=0)
    np.testing.assert_array_equal(a, c2.sample("train", 3, 8, seed=0))
    with pytest.raises(DataError, match="longer than the corpus allows"):
        c1.sample("valid", 1, c1.streams["valid"].size + 1, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        c1.stream("dev")


def test_build_corpus_with_given_tokenizer(tmp_path):
    root = _write_corpus(tmp_path / "src", [f"# file {i}\n{t}" for i, t in enumerate(TEXTS * 3)])
    tok = tok_lib.train_bpe(TEXTS, 280, min_frequency=1)
    tok_lib.save_tokenizer(tok, tmp_path / "teacher_tok")
    data_cfg, tok_cfg = _cfgs(root)
    c = corpus_lib.build_corpus(
        data_cfg, tok_cfg, str(tmp_path / "cache"), tokenizer_path=str(tmp_path / "teacher_tok")
    )
    assert c.vocab_size == len(tok)
    assert not os.path.exists(tmp_path / "cache" / "tokenizer")  # nothing trained
    first = _documents(c, "train")[0]
    ids = tok(first, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(c.streams["train"][: len(ids) + 1], ids + [tok.eos_token_id])


def test_bpe_sample_is_bounded_fixed_and_spread(tmp_path):
    texts = [f"document {i}\n" + "x" * (i % 7) for i in range(200)]
    kept = [
        corpus_lib.KeptDocument(sources.Entry(f"{i:03d}", None), split.content_key(t), len(t))
        for i, t in enumerate(texts)
    ]
    total = sum(k.num_bytes for k in kept)
    assert corpus_lib.bpe_sample(kept, 0) == kept
    assert corpus_lib.bpe_sample(kept, total) == kept
    sample = corpus_lib.bpe_sample(kept, total // 4)
    assert total // 4 - 20 < sum(k.num_bytes for k in sample) <= total // 4
    assert corpus_lib.bpe_sample(kept[::-1], total // 4) == sample  # order of input: none
    ids = sorted(int(k.entry.id) for k in sample)
    assert ids[0] < 20 and ids[-1] >= 180  # spread over the split, not its first documents
    # The sample size is a setting of the trained tokenizer: changing it trains another.
    root = _write_corpus(tmp_path / "src", [f"# {i}\n{t}" for i, t in enumerate(TEXTS * 4)])
    data_cfg, tok_cfg = _cfgs(root)
    cache = str(tmp_path / "cache")
    full = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    data_cfg.bpe_sample_bytes = 200
    small = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    fingerprint = corpus_lib.tokenizer_fingerprint
    assert fingerprint(small.tokenizer) != fingerprint(full.tokenizer)
    assert small.num_documents == full.num_documents


def test_bpe_sample_skips_documents_that_overflow_it():
    sizes = [5000] + [300] * 30
    kept = [
        corpus_lib.KeptDocument(sources.Entry(f"{i:03d}", None), bytes([i]), n)
        for i, n in enumerate(sizes)
    ]  # the 5000-byte document comes first in key order
    sample = corpus_lib.bpe_sample(kept, 4096)
    assert sum(k.num_bytes for k in sample) == 13 * 300
    with pytest.raises(DataError, match="below the smallest train document"):
        corpus_lib.bpe_sample(kept, 200)


def test_cache_keys_on_the_eos_token_and_on_what_a_relative_source_reads(tmp_path, monkeypatch):
    """The same tokenizer.json with another eos is another cache; so is `files:docs` read from
    another directory."""
    for project, word in (("a", "alpha"), ("b", "omega")):
        _write_corpus(tmp_path / project / "docs", [f"{word} {i}\n" * 20 for i in range(12)])
    tok = tok_lib.train_bpe(TEXTS * 20, 300, min_frequency=1)
    tok_lib.save_tokenizer(tok, tmp_path / "tok")
    data_cfg, tok_cfg = _cfgs("files:docs")
    cache = str(tmp_path / "cache")

    def build(project, tokenizer="tok"):
        monkeypatch.chdir(tmp_path / project)
        path = str(tmp_path / tokenizer)
        return corpus_lib.build_corpus(data_cfg, tok_cfg, cache, tokenizer_path=path)

    assert _documents(build("a"), "train")[0].startswith("alpha")
    assert _documents(build("b"), "train")[0].startswith("omega")
    other = tok_lib.load_tokenizer(tmp_path / "tok")
    other.eos_token = "<|pad|>"
    tok_lib.save_tokenizer(other, tmp_path / "tok_pad_eos")
    c = build("a", "tok_pad_eos")
    assert c.eos_id == 0
    assert int((c.streams["train"] == 0).sum()) == c.num_documents["train"]
    assert len([d for d in os.listdir(cache) if d.startswith("tokens-")]) == 3
    # an edited document is other text: a new cache, not the old tokens
    edited = sorted((tmp_path / "a" / "docs").iterdir())[0]
    edited.write_text("zeta " * 40)
    assert any(
        d.startswith("zeta")
        for d in _documents(build("a"), "train")
        + _documents(build("a"), "valid")
        + _documents(build("a"), "test")
    )
    assert len([d for d in os.listdir(cache) if d.startswith("tokens-")]) == 4


def test_duplicates_never_straddle_train_and_eval(tmp_path):
    # 12 distinct texts, each under 8 names: an id-hashed split would put most texts in
    # train and in an evaluation split at once.
    texts = [f"value_{i} = {i} * {i}\n" for i in range(12)]
    root = _write_corpus(tmp_path / "src", [t for t in texts for _ in range(8)])
    data_cfg, tok_cfg = _cfgs(root, valid_fraction=0.25, test_fraction=0.25)
    c = corpus_lib.build_corpus(data_cfg, tok_cfg, str(tmp_path / "cache"))
    docs = {s: _documents(c, s) for s in split.SPLITS}
    assert sorted(t for s in split.SPLITS for t in docs[s]) == sorted(texts * 8)
    assert docs["valid"] and docs["test"]
    assert not set(docs["train"]) & (set(docs["valid"]) | set(docs["test"]))
    assert not set(docs["valid"]) & set(docs["test"])


def test_cache_format_is_versioned_and_builds_are_all_or_nothing(tmp_path, monkeypatch):
    root = _write_corpus(tmp_path / "src", [f"# {i}\n{t}" for i, t in enumerate(TEXTS * 2)])
    data_cfg, tok_cfg = _cfgs(root)
    cache = str(tmp_path / "cache")
    c1 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    (old,) = [d for d in os.listdir(cache) if d.startswith("tokens-")]

    def tokens_dirs():
        return sorted(d for d in os.listdir(cache) if d.startswith("tokens-"))

    # Another cache format has another key: a new directory, the old one is not read.
    monkeypatch.setattr(corpus_lib, "TOKEN_FORMAT", corpus_lib.TOKEN_FORMAT + 1)
    real_encode = tok_lib.encode_batches

    def interrupted(*args, **kwargs):
        yield from real_encode(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tok_lib, "encode_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert tokens_dirs() == [old]  # nothing half-written left behind
    monkeypatch.setattr(tok_lib, "encode_batches", real_encode)
    c2 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert len(tokens_dirs()) == 2
    for s in split.SPLITS:
        np.testing.assert_array_equal(c1.streams[s], c2.streams[s])


def test_progress_bars_name_the_split(tmp_path, monkeypatch):
    descs = []
    real = corpus_lib.progress

    def recording(*args, **kwargs):
        descs.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_lib, "progress", recording)
    root = _write_corpus(tmp_path / "src", TEXTS)
    corpus_lib.build_corpus(*_cfgs(root), str(tmp_path / "cache"))
    assert descs == [
        "read documents",
        "train BPE on the train split",
        "tokenize train",
        "tokenize valid",
        "tokenize test",
    ]
