"""Input checks of the data pipeline: binary files, undecodable bytes, size limit, memory."""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from taylorcal_jax.data import corpus as corpus_lib
from taylorcal_jax.data import reading, sources
from taylorcal_jax.data.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import common  # noqa: E402
import tiny  # noqa: E402

CODE = "def f{i}(x):\n    return x * {i} + len('text {i}')\n\n\nprint(f{i}(3))\n"


def _cfgs(source, **data):
    c = common.get_config()
    c.data.source = source
    c.data.valid_fraction = 0.2
    c.data.test_fraction = 0.2
    c.data.update(data)
    c.tokenizer.vocab_size = 300
    c.tokenizer.min_frequency = 1
    return c.data, c.tokenizer


def _write(root, name, data: bytes):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name), "wb") as f:
        f.write(data)


def _texts(root, n=12):
    for i in range(n):
        _write(root, f"code{i:02d}.py", CODE.format(i=i).encode())


def _entry(data: bytes):
    return sources.Entry("x", lambda: io.BytesIO(data))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------ one document


def test_decode_utf8_counts_and_replaces_undecodable_bytes():
    assert reading.decode_utf8("héllo ✓ 😀".encode()) == ("héllo ✓ 😀", 0)
    # A U+FFFD that is in the text is text, not an undecodable byte.
    assert reading.decode_utf8("a\ufffdb".encode()) == ("a\ufffdb", 0)
    text, n = reading.decode_utf8("café naïve".encode("latin-1"))
    assert (text, n) == ("caf\ufffd na\ufffdve", 2)
    # A truncated 3-byte sequence is 2 undecodable bytes; then valid UTF-8 again.
    assert reading.decode_utf8(b"x\xe2\x9cy\xe2\x9c\x93") == ("x\ufffd\ufffdy✓", 2)


def test_read_entry_classifies():
    limit = 100

    def status(data):
        return reading.read_entry(_entry(data), limit).status

    assert status(b"ok\n") == "text"
    assert status(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR") == "binary"
    assert status(b"a" * 90 + b"\0") == "binary"
    assert status(b"a" * 101) == "too_large"
    assert status(b"a" * 100) == "text"
    assert status(b" \n\t\n") == "empty"
    # Only the first 8 KiB are sniffed for NUL (as git does); a later NUL is text.
    assert reading.read_entry(_entry(b"a" * 9000 + b"\0"), 10_000).status == "text"

    def unreadable():
        raise PermissionError("no")

    assert reading.read_entry(sources.Entry("x", unreadable), limit).status == "unreadable"
    r = reading.read_entry(_entry("ça\n".encode("latin-1")), limit)
    assert (r.status, r.text, r.undecodable_bytes, r.num_bytes) == ("text", "\ufffda\n", 1, 3)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("max_file_bytes", 0, "max_file_bytes must be a positive integer"),
        ("max_file_bytes", -5, "max_file_bytes must be a positive integer"),
        ("max_undecodable_fraction", -0.1, r"max_undecodable_fraction must be in \[0, 1\]"),
        ("max_undecodable_fraction", 1.5, r"max_undecodable_fraction must be in \[0, 1\]"),
        ("max_documents", -1, "max_documents must be an integer >= 0"),
        ("bpe_sample_bytes", -1, "bpe_sample_bytes must be an integer >= 0"),
        ("valid_fraction", 0.99, "fraction"),
        ("source", "s3://bucket", "unknown data source"),
    ],
)
def test_bad_data_values_fail_in_validation(key, value, match, tmp_path):
    from taylorcal_jax.errors import ConfigError
    from taylorcal_jax.run import validate
    from taylorcal_jax.stage_registry import STAGES

    config = tiny.get_config("smoke")
    config.data[key] = value
    with pytest.raises(ConfigError, match=match):
        validate.validate(config, STAGES, str(tmp_path))


def test_default_limits():
    limits = corpus_lib.check_data_config(common.get_config().data)
    assert limits == reading.ReadLimits(max_file_bytes=4 << 20, max_undecodable_fraction=1e-4)


# ------------------------------------------------------------------ whole sources


def test_binary_files_are_skipped_with_count_and_examples(tmp_path, caplog):
    root = tmp_path / "src"
    _texts(root)
    rng = np.random.default_rng(0)
    for i in range(30):
        _write(root, f"blob{i:02d}.bin", b"\0" + rng.bytes(2000))
    c = corpus_lib.build_corpus(*_cfgs(str(root)), str(tmp_path / "cache"))
    assert sum(c.num_documents.values()) == 12
    assert c.report["skipped"]["binary"] == 30
    (line,) = [w for w in _warnings(caplog) if "binary" in w]
    assert "skipped 30 binary file(s)" in line and "blob00.bin, blob01.bin, blob02.bin" in line
    # Nothing of the binaries reached the streams: they decode to the code files alone.
    for s in c.streams:
        assert "\ufffd" not in c.tokenizer.decode(np.asarray(c.streams[s]))


def test_undecodable_bytes_are_counted_then_refused_above_the_threshold(tmp_path, caplog):
    root = tmp_path / "src"
    _texts(root)
    for i in range(4):
        _write(root, f"latin{i}.txt", f"Le café {i} est très bon, déjà vu.\n".encode("latin-1"))
    data_cfg, tok_cfg = _cfgs(str(root))
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as e:
        corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    msg = str(e.value)
    assert "\n" not in msg
    assert "16 of " in msg and "in 4 document(s) are not valid UTF-8" in msg
    assert "latin0.txt (4 B)" in msg and "iconv" in msg and "max_undecodable_fraction" in msg
    assert not [d for d in os.listdir(cache) if d.startswith("tokens-")]  # refused before work
    # Raised threshold: kept with U+FFFD, and said so.
    data_cfg.max_undecodable_fraction = 0.05
    c = corpus_lib.build_corpus(data_cfg, tok_cfg, cache)
    assert c.report["undecodable_bytes"] == 16 and c.report["undecodable_documents"] == 4
    (line,) = [w for w in _warnings(caplog) if "UTF-8" in w]
    assert "16 of" in line and "replaced by U+FFFD" in line
    text = "".join(c.tokenizer.decode(np.asarray(s)) for s in c.streams.values())
    assert text.count("\ufffd") == 16
    # The cached corpus is checked against the threshold in force, not the one it was built with.
    data_cfg.max_undecodable_fraction = 1e-4
    with pytest.raises(DataError, match="not valid UTF-8"):
        corpus_lib.build_corpus(data_cfg, tok_cfg, cache)


def test_size_limit_skips_large_files_and_says_how_to_keep_them(tmp_path, caplog):
    root = tmp_path / "src"
    _texts(root)
    _write(root, "huge.py", b"x = 1\n" * 400)  # 2,400 bytes
    data_cfg, tok_cfg = _cfgs(str(root), max_file_bytes=1000)
    c = corpus_lib.build_corpus(data_cfg, tok_cfg, str(tmp_path / "cache"))
    assert sum(c.num_documents.values()) == 12 and c.report["skipped"]["too_large"] == 1
    (line,) = [w for w in _warnings(caplog) if "larger than" in w]
    assert "skipped 1 file(s) larger than data.max_file_bytes=1000" in line
    assert "huge.py" in line and "raise data.max_file_bytes" in line
    # Raised limit: kept.
    data_cfg.max_file_bytes = 4096
    c = corpus_lib.build_corpus(data_cfg, tok_cfg, str(tmp_path / "cache"))
    assert sum(c.num_documents.values()) == 13
    # Nothing left: refused, saying why.
    data_cfg.max_file_bytes = 10
    with pytest.raises(DataError, match=r"no text documents \(skipped: 13 larger than data.max"):
        corpus_lib.build_corpus(data_cfg, tok_cfg, str(tmp_path / "cache"))


def test_max_documents_counts_kept_documents_and_reads_no_further(tmp_path):
    root = tmp_path / "src"
    _texts(root, 20)
    _write(root, "a_blob.bin", b"\0\1\2")  # sorts first
    data_cfg, tok_cfg = _cfgs(str(root), max_documents=5)
    c = corpus_lib.build_corpus(data_cfg, tok_cfg, str(tmp_path / "cache"))
    assert sum(c.num_documents.values()) == 5
    assert c.report["documents"] == 5 and c.report["skipped"]["binary"] == 1


# ------------------------------------------------------------------ bounded memory

# Builds a corpus in a fresh interpreter and prints {"error"|"documents", "rss_growth_mb"}:
# the peak resident set during the build less the resident set before it (Linux: writing 5
# to /proc/self/clear_refs resets the peak, VmHWM, to the current size).
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    sys.path.insert(0, sys.argv[1] + "/configs")
    import common
    from taylorcal_jax.data import corpus as corpus_lib
    from taylorcal_jax.data import tokenizer as tok_lib
    from taylorcal_jax.data.errors import DataError
    from taylorcal_jax.utils import progress

    def status_mb(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) / 1024

    progress.set_enabled(False)
    c = common.get_config()
    c.data.source, c.data.max_file_bytes = sys.argv[2], int(sys.argv[3])
    c.tokenizer.vocab_size, c.tokenizer.min_frequency = 300, 1
    # Import what a build imports (transformers' AutoTokenizer alone is ~190 MB) beforehand.
    tok_lib.save_tokenizer(tok_lib.train_bpe(["warm up"], 300), sys.argv[4] + "-warm-up")
    tok_lib.load_tokenizer(sys.argv[4] + "-warm-up")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mb("VmRSS")
    try:
        corpus = corpus_lib.build_corpus(c.data, c.tokenizer, sys.argv[4])
        out = {"documents": sum(corpus.num_documents.values()), "report": corpus.report}
    except DataError as e:
        out = {"error": str(e)}
    out["rss_growth_mb"] = status_mb("VmHWM") - before
    print(json.dumps(out))
    """
)
_BIG = 127 << 20  # the size of the file that, read whole, took a run to 18 GB


def _build_in_subprocess(tmp_path, source, max_file_bytes):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident set")
    cmd = [sys.executable, "-c", _RSS_SCRIPT, ROOT, source, str(max_file_bytes)]
    cmd.append(str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forty_binaries_one_of_127_mb_refused_clearly_in_bounded_memory(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(39):
        _write(root, f"lib{i:02d}.so", b"\x7fELF\2\1\1\0" + rng.bytes(4000))
    with open(root / "weights.bin", "wb") as f:
        f.truncate(_BIG)  # sparse: all NUL bytes, no disk or time spent
    # Even with a size limit above the big file, only its first 8 KiB are read.
    out = _build_in_subprocess(tmp_path, str(root), 1 << 30)
    assert "has no text documents (skipped: 40 binary)" in out["error"]
    assert out["rss_growth_mb"] < 64, out


def test_127_mb_text_file_is_skipped_by_size_in_bounded_memory(tmp_path):
    root = tmp_path / "src"
    _texts(root)
    rng = np.random.default_rng(0)
    for i in range(39):
        _write(root, f"lib{i:02d}.so", b"\x7fELF\2\1\1\0" + rng.bytes(4000))
    with open(root / "dump.txt", "wb") as f:
        block = b"SELECT * FROM table WHERE id = 12345;\n" * (1 << 15)  # 1.2 MiB
        while f.tell() < _BIG:
            f.write(block)
    out = _build_in_subprocess(tmp_path, str(root), common.get_config().data.max_file_bytes)
    assert out["documents"] == 12, out
    assert out["report"]["skipped"]["binary"] == 39
    assert out["report"]["skipped"]["too_large"] == 1
    assert out["report"]["skipped_examples"]["too_large"] == ["dump.txt"]
    assert out["rss_growth_mb"] < 64, out
