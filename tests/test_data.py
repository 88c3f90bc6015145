"""Data pipeline: sources, split, tokenizer, packing, sampling, cached corpus."""

import os

import ml_collections
import numpy as np
import pytest

from taylorcal_jax.data import corpus as corpus_lib
from taylorcal_jax.data import packing, sources, split
from taylorcal_jax.data import tokenizer as tok_lib

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


# ------------------------------------------------------------------ sources


@pytest.mark.parametrize("bad", ["", "   ", "s3://bucket/x", "hf:", "hf:a:b:c"])
def test_parse_source_rejects_unknown(bad):
    with pytest.raises(ValueError):
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


def test_file_source_glob_dir_and_errors(tmp_path):
    root = _write_corpus(tmp_path / "c", TEXTS)
    by_dir = sources.load_documents(root)
    by_glob = sources.load_documents("files:" + os.path.join(root, "*.py"))
    assert [d.id for d in by_dir] == [d.id for d in by_glob] == [f"doc{i:03d}.py" for i in range(6)]
    assert by_dir[4].text == TEXTS[4]
    with pytest.raises(FileNotFoundError, match="no files match"):
        sources.load_documents(str(tmp_path / "nothing*.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        sources.load_documents(str(empty))


def test_hf_source_clear_error_when_unavailable():
    try:
        import datasets  # noqa: F401

        expected = RuntimeError  # installed: offline here, so loading must fail clearly
    except ImportError:
        expected = ImportError
    with pytest.raises(expected, match="datasets|could not load"):
        sources.load_documents("hf:surely_not_a_local_dataset_xyz")


# ------------------------------------------------------------------ split


def test_split_deterministic_independent_and_proportional():
    docs = [sources.Document(f"pkg/mod_{i}.py", "x") for i in range(2000)]
    a = split.split_documents(docs, valid_fraction=0.1, test_fraction=0.2, seed=3)
    b = split.split_documents(docs[::-1], valid_fraction=0.1, test_fraction=0.2, seed=3)
    for s in split.SPLITS:
        assert sorted(d.id for d in a[s]) == sorted(d.id for d in b[s])
    # A document's split does not depend on the others.
    sub = split.split_documents(docs[:100], valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert {d.id for d in sub["valid"]} == {d.id for d in a["valid"] if int(d.id[8:-3]) < 100}
    n = len(docs)
    assert abs(len(a["valid"]) / n - 0.1) < 0.03 and abs(len(a["test"]) / n - 0.2) < 0.03
    c = split.split_documents(docs, valid_fraction=0.1, test_fraction=0.2, seed=4)
    assert {d.id for d in c["valid"]} != {d.id for d in a["valid"]}


@pytest.mark.parametrize("fv,ft", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_split_bad_fractions(fv, ft):
    with pytest.raises(ValueError, match="fraction"):
        split.split_documents([], valid_fraction=fv, test_fraction=ft, seed=0)


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
    with pytest.raises(ValueError, match="at least 259"):
        tok_lib.train_bpe(TEXTS, 100)


# ------------------------------------------------------------------ corpus (cached)


def _cfgs(source, **data):
    d = ml_collections.ConfigDict(
        dict(
            source=source,
            include_tests=True,
            max_documents=0,
            valid_fraction=0.3,
            test_fraction=0.2,
            split_seed=0,
        )
    )
    d.update(data)
    t = ml_collections.ConfigDict(dict(path="", vocab_size=300, min_frequency=1))
    return d, t


def test_build_corpus_packs_caches_and_rekeys(tmp_path):
    root = _write_corpus(tmp_path / "src", [t * (i + 1) for i, t in enumerate(TEXTS * 4)])
    data_cfg, tok_cfg = _cfgs(root)
    cache = str(tmp_path / "cache")
    c1 = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert sum(c1.num_documents.values()) == 24 and min(c1.num_documents.values()) > 0
    for s, stream in c1.streams.items():
        assert stream.dtype == np.int32 and stream[-1] == c1.eos_id
        assert int((stream == c1.eos_id).sum()) == c1.num_documents[s]
    # Tokenizer was trained on the train split only and saved as an HF dir.
    assert os.path.exists(os.path.join(cache, "tokenizer", "tokenizer.json"))
    # The train stream decodes back to the train documents in id order.
    parts = split.split_documents(
        sources.load_documents(root), valid_fraction=0.3, test_fraction=0.2, seed=0
    )
    first = c1.streams["train"][: int(np.argmax(c1.streams["train"] == c1.eos_id))]
    assert c1.tokenizer.decode(first) == parts["train"][0].text
    # Second build: loaded from the .npy cache, identical.
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
    with pytest.raises(ValueError, match="longer than the corpus allows"):
        c1.sample("valid", 1, c1.streams["valid"].size + 1, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        c1.stream("dev")


def test_build_corpus_with_given_tokenizer(tmp_path):
    root = _write_corpus(tmp_path / "src", TEXTS * 3)
    tok = tok_lib.train_bpe(TEXTS, 280, min_frequency=1)
    tok_lib.save_tokenizer(tok, tmp_path / "teacher_tok")
    data_cfg, tok_cfg = _cfgs(root)
    c = corpus_lib.build_corpus(
        data_cfg, tok_cfg, str(tmp_path / "cache"), tokenizer_path=str(tmp_path / "teacher_tok")
    )
    assert c.vocab_size == len(tok)
    assert not os.path.exists(tmp_path / "cache" / "tokenizer")  # nothing trained
    docs = sources.load_documents(root)
    parts = split.split_documents(docs, valid_fraction=0.3, test_fraction=0.2, seed=0)
    ids = tok(parts["train"][0].text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(c.streams["train"][: len(ids) + 1], ids + [tok.eos_token_id])
