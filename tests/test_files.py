"""utils/files: a file is replaced whole or not at all."""

import json
import os

import pytest

from taylorcal_jax.utils import files


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "record.json")
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2, "b": [1, 2]})
    with open(path) as f:
        assert json.load(f) == {"a": 2, "b": [1, 2]}
    assert os.listdir(tmp_path) == ["record.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "weights.bin")
    files.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), files.replaced_when_done(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_temporary_name_is_per_process_and_ends_in_partial(tmp_path):
    name = files.temporary_name(str(tmp_path / "x.json"))
    assert name.endswith(files.PARTIAL) and str(os.getpid()) in name
