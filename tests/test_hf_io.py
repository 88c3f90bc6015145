"""hf_io: save/load round trips (single file, sharded, bf16) and a clear error per bad input."""

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.models import hf_io
from taylorcal_jax.models.config import UnsupportedModelError
from taylorcal_jax.models.hf_io import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingTensorsError,
    ShapeMismatchError,
    UnexpectedTensorsError,
    load_pretrained,
    save_pretrained,
)
from taylorcal_jax.models.safetensors_io import read_tensors, write_tensors
from taylorcal_jax.models.teacher import init_params

CONFIG = tiny_model_config()


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
    return save_pretrained(tmp_path_factory.mktemp("ck") / "llama", CONFIG, params)


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _same(a, b):
    return jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda x, y: x.dtype == y.dtype and bool(jnp.array_equal(x, y)), a, b
        )
    )


def test_round_trip_single_file(saved, params):
    assert (saved / "model.safetensors").exists()
    config, loaded = load_pretrained(saved)
    assert config == CONFIG
    assert _same(loaded, params)


def test_round_trip_sharded_bf16(tmp_path, params):
    out = save_pretrained(tmp_path / "s", CONFIG, params, dtype=jnp.bfloat16, max_shard_bytes=5000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_pretrained(out)
    expect = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert _same(loaded, expect)
    _, as32 = load_pretrained(out, dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(as32))


def test_tied_embeddings_have_no_head(tmp_path):
    import dataclasses

    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    p = init_params(tied, jax.random.PRNGKey(1))
    assert "lm_head" not in p
    _, loaded = load_pretrained(save_pretrained(tmp_path / "t", tied, p))
    assert _same(loaded, p)
    with pytest.raises(ValueError, match="lm_head"):
        save_pretrained(tmp_path / "bad", tied, {**p, "lm_head": {"kernel": jnp.zeros((32, 64))}})


def test_names_match_transformers_layout(saved):
    names = set(read_tensors(saved / "model.safetensors"))
    assert "model.layers.1.self_attn.k_proj.weight" in names
    assert "model.layers.0.post_attention_layernorm.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    w = read_tensors(saved / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    assert w.shape == (2 * 8, 32)  # [out, in] as torch.nn.Linear


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(CheckpointNotFoundError, match="hub id"):
        load_pretrained("no-such-org-xyz/no-such-model")


def test_file_instead_of_directory(saved):
    with pytest.raises(CheckpointNotFoundError, match="directory"):
        load_pretrained(saved / "config.json")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_pretrained(copy)


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        load_pretrained(copy)


def test_pickle_weights_are_refused(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointNotFoundError, match="pickle"):
        load_pretrained(copy)


def test_unsupported_model_type(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, mistral"):
        load_pretrained(copy)


def test_truncated_file(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_pretrained(copy)


def test_corrupt_header(copy):
    f = copy / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match="JSON"):
        load_pretrained(copy)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        load_pretrained(copy)


def _rewrite(path, edit):
    tensors = {k: np.array(v) for k, v in read_tensors(path).items()}
    edit(tensors)
    write_tensors(path, tensors)


def test_missing_tensor(copy):
    _rewrite(copy / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorsError, match="up_proj"):
        load_pretrained(copy)


def test_unexpected_tensor(copy):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)

    _rewrite(copy / "model.safetensors", add)
    # a teacher's error names the families we read: the stray tensor may be another family's
    with pytest.raises(UnexpectedTensorsError, match=r"extra.*supported families: llama"):
        load_pretrained(copy)


def test_shape_mismatch_with_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="gate_proj"):
        load_pretrained(copy)


def test_sharded_index_with_missing_shard(tmp_path, params):
    out = save_pretrained(tmp_path / "s", CONFIG, params, max_shard_bytes=5000)
    index = json.loads((out / hf_io.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (out / victim).unlink()
    with pytest.raises(CheckpointNotFoundError, match=victim):
        load_pretrained(out)


def test_sharded_index_inconsistent(tmp_path, params):
    out = save_pretrained(tmp_path / "s", CONFIG, params, max_shard_bytes=5000)
    path = out / hf_io.INDEX_FILE
    index = json.loads(path.read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"]["model.ghost.weight"] = index["weight_map"][name]
    path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="ghost"):
        load_pretrained(out)


def test_index_names_its_files_as_paths(tmp_path, params):
    # "./model-00001-of-00003.safetensors" names the same file, and transformers reads it
    out = save_pretrained(tmp_path / "s", CONFIG, params, max_shard_bytes=5000)
    path = out / hf_io.INDEX_FILE
    index = json.loads(path.read_text())
    index["weight_map"] = {k: "./" + v for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    assert _same(load_pretrained(out)[1], params)


def test_a_scalar_tensor_keeps_its_shape(tmp_path):
    path = tmp_path / "x.safetensors"
    write_tensors(path, {"s": np.float32(2.5) * np.ones(()), "v": np.arange(3, dtype=np.int32)})
    got = read_tensors(path)
    assert got["s"].shape == () and float(got["s"]) == 2.5 and got["v"].shape == (3,)


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bars_follow_the_global_switch(tmp_path, params, capsys, enabled):
    from taylorcal_jax.utils import progress

    progress.set_enabled(enabled)
    try:
        path = save_pretrained(tmp_path / "sharded", CONFIG, params, max_shard_bytes=1)
        load_pretrained(path)
    finally:
        progress.set_enabled(True)
    err = capsys.readouterr().err
    for desc in ("saving", "loading"):
        assert (desc in err) == enabled, err


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_pretrained_teacher_of_each_family_loads_back(tmp_path, model_type):
    # the pretrain stage's architecture carries its family's features (qwen2's q/k/v biases,
    # qwen3's q/k norm), so the teacher it saves is that family's model, here and in transformers
    from configs.tiny import get_config
    from taylorcal_jax.run.inputs import pretrained_architecture

    section = get_config().teacher
    section.model_type = model_type
    config = pretrained_architecture(section, 64)
    params = init_params(config, jax.random.PRNGKey(0))
    loaded_config, loaded = load_pretrained(save_pretrained(tmp_path / "t", config, params))
    assert loaded_config == config and _same(loaded, params)
