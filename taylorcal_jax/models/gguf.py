"""GGUF teachers: a `.gguf` file converted once into a Hugging Face safetensors directory.

A GGUF file (llama.cpp's format) holds the weights, often block-quantised (Q4_1, Q8_0, ...),
plus the architecture and the tokenizer as metadata. transformers reads it
(`from_pretrained(folder, gguf_file=name)`, needs the `gguf` and `accelerate` packages) and
dequantises every tensor to float32, undoing llama.cpp's row order of q/k on the way. This
module writes the result as an ordinary checkpoint directory (config.json, model.safetensors,
tokenizer files), which `hf_io.load_pretrained` and `AutoTokenizer` then read like any other:

    teacher_dir = resolve_teacher_dir("/models/SmolLM2-135M-Instruct.Q4_1.gguf", workdir_cache)

The conversion is cached under `cache_root/<file stem>-<md5 prefix>/` with a record
(`gguf_source.json`) of what it was made from: the source's path, size, mtime and md5, the
transformers version and the stored dtype. A later call reuses the directory when size and mtime
still match the record (no rereading), or, when they changed, when the md5 still matches; a
different file or transformers version is converted again. Output is written to a temporary
directory and renamed into place, so an interrupted conversion leaves no half-written cache.

The loaded config carries a `quantization_config` that makes transformers' `save_pretrained`
refuse, so the weights are moved (no copy) into a fresh model built from the config without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import time

from taylorcal_jax.models.config import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from taylorcal_jax.models.hf_io import CheckpointError, CheckpointNotFoundError
from taylorcal_jax.utils import files

SUFFIX = ".gguf"
RECORD_FILE = "gguf_source.json"
# Bumped when the layout of a converted directory changes, so that old caches are rebuilt.
FORMAT_VERSION = 1
STORED_DTYPE = "float32"
_MAGIC = b"GGUF"
# The packages transformers' GGUF loader imports (extra `gguf` of setup.cfg).
REQUIRED_PACKAGES = ("gguf", "accelerate", "torch", "transformers")
INSTALL_HINT = "pip install 'taylorcal_jax[gguf]'"
WORKDIR_CACHE = "gguf"  # a run's converted .gguf teachers: <workdir>/gguf


class GGUFError(CheckpointError):
    """The file is not a GGUF file, or transformers could not convert it."""


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """What a converted directory was made from (stored as RECORD_FILE inside it)."""

    source: str  # absolute path of the .gguf file
    size: int
    mtime_ns: int
    md5: str
    transformers: str
    dtype: str = STORED_DTYPE
    format: int = FORMAT_VERSION

    def describes(self, source: str, stat: os.stat_result, transformers: str) -> bool:
        """Whether this record is of `source` as it is now (same path, size and mtime), converted
        by the running code (same transformers version, dtype and format)."""
        return (self.source, self.size, self.mtime_ns, self.transformers) == (
            source,
            stat.st_size,
            stat.st_mtime_ns,
            transformers,
        ) and (self.dtype, self.format) == (STORED_DTYPE, FORMAT_VERSION)

    def same_build(self, other: SourceRecord) -> bool:
        """Same file contents converted by the same code (path, size and mtime aside)."""
        return (self.md5, self.transformers, self.dtype, self.format) == (
            other.md5,
            other.transformers,
            other.dtype,
            other.format,
        )


def is_gguf_path(path: str) -> bool:
    return str(path).lower().endswith(SUFFIX)


def require_packages() -> None:
    """ImportError naming the pip command when a package transformers' GGUF loader needs is
    absent (checked before any work)."""
    missing = [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"reading a .gguf teacher needs the packages {', '.join(missing)}: {INSTALL_HINT}"
        )


def file_md5(path: str, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def transformers_version() -> str:
    import transformers  # noqa: PLC0415

    return transformers.__version__


def gguf_architecture(path: str) -> str:
    """`general.architecture` of a GGUF file (reads the header only); GGUFError if the file
    is not GGUF."""
    return _header(path)[1]


def _header(path: str):
    """(gguf's reader of the file, memory-mapped with its header parsed; its
    `general.architecture`); GGUFError if the file is not GGUF or its header is unreadable."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})")
    from gguf import GGUFReader  # noqa: PLC0415

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return reader, bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, IndexError) as e:
        raise GGUFError(f"{path}: unreadable GGUF header ({type(e).__name__}: {e})") from e


def _say(message: str) -> None:
    print(f"[gguf] {message}", file=sys.stderr, flush=True)


def _read_record(directory: str) -> SourceRecord | None:
    try:
        with open(os.path.join(directory, RECORD_FILE)) as f:
            return SourceRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(directory: str, record: SourceRecord) -> None:
    files.write_json(os.path.join(directory, RECORD_FILE), dataclasses.asdict(record))


def _cache_name(stem: str, md5: str) -> str:
    return f"{stem}-{md5[:12]}"


def _cached_dirs(cache_root: str, stem: str) -> list[str]:
    """Finished conversions of files named `stem` (temporary directories excluded)."""
    if not os.path.isdir(cache_root):
        return []
    pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{12}")
    names = sorted(n for n in os.listdir(cache_root) if pattern.fullmatch(n))
    return [os.path.join(cache_root, n) for n in names]


def _tmp_name(target: str, pid: int) -> str:
    """Where process `pid` of this host converts into `target` before renaming it."""
    return f"{target}.tmp-{socket.gethostname()}-{pid}"


def _remove_dead_conversions(cache_root: str) -> None:
    """Deletes the temporary directories of conversions on this host whose process is gone
    (killed while converting: the model's size in float32, never reused otherwise)."""
    pattern = re.compile(r".+\.tmp-" + re.escape(socket.gethostname()) + r"-(\d+)")
    for name in os.listdir(cache_root):
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(cache_root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def convert(gguf_path: str, out_dir: str) -> None:
    """Dequantises `gguf_path` with transformers and writes a float32 HF checkpoint directory
    (config.json, model.safetensors, tokenizer files) to `out_dir` (created; must not exist)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    state = {k: v.detach().to(torch.float32) for k, v in loaded.state_dict().items()}
    hf = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "name_or_path"):
        hf.pop(key, None)
    config = type(loaded.config).from_dict(hf)
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    os.makedirs(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_gguf_file(path: str) -> str:
    """Checks, in a fraction of a second, that `path` is a GGUF file of an architecture the
    project loads and that the packages to convert it are installed; returns the architecture.
    Raises CheckpointNotFoundError, ImportError, GGUFError or UnsupportedModelError."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"GGUF teacher file {path} does not exist")
    require_packages()
    reader, arch = _header(path)
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    scaling = _rope_scaling_entries(reader, arch)
    if scaling:
        raise UnsupportedModelError(
            f"{path}: GGUF RoPE scaling ({', '.join(scaling)}) is dropped by transformers' "
            "GGUF loader, so the teacher would run with plain RoPE; use this model's Hugging "
            "Face checkpoint directory instead"
        )
    return arch


def _rope_scaling_entries(reader, arch: str) -> list[str]:
    """The RoPE scaling a GGUF file holds (llama.cpp writes Llama 3.1/3.2's llama3 factors as
    the tensor rope_freqs.weight, yarn and linear scaling as <arch>.rope.scaling.* keys), which
    transformers 5's GGUF loader does not read for these architectures."""
    found = [t.name for t in reader.tensors if t.name == "rope_freqs.weight"]
    return found + [k for k in reader.fields if k.startswith(f"{arch}.rope.scaling.")]


def resolve_teacher_dir(path: str, cache_root: str) -> str:
    """The checkpoint directory for teacher path `path`.

    Anything but a `.gguf` file name (a checkpoint directory, a hub id) is returned unchanged.
    A `.gguf` file is converted once into `cache_root` (see the module docstring) and the
    converted directory is returned. Raises CheckpointNotFoundError (no such file), GGUFError
    (not GGUF, or conversion failed), UnsupportedModelError (an architecture the project does
    not load) or ImportError (missing packages), all before any long work
    (`check_gguf_file`). A run keeps its conversions in `<workdir>/WORKDIR_CACHE`.
    """
    if not is_gguf_path(path):
        return path
    source = os.path.abspath(os.path.expanduser(str(path)))
    arch = check_gguf_file(source)
    stat = os.stat(source)
    version = transformers_version()
    stem = os.path.splitext(os.path.basename(source))[0]
    for directory in _cached_dirs(cache_root, stem):
        rec = _read_record(directory)
        if rec is not None and rec.describes(source, stat, version):
            return directory  # unchanged file: no rereading
    _say(f"checksumming {source} ({stat.st_size / 1e6:.0f} MB)")
    record = SourceRecord(source, stat.st_size, stat.st_mtime_ns, file_md5(source), version)
    target = os.path.join(cache_root, _cache_name(stem, record.md5))
    old = _read_record(target)
    if old is not None and old.same_build(record):
        _write_record(target, record)  # same contents, new path/mtime: remember the new stat
        return target
    _say(f"converting {source} (architecture {arch}) to a {STORED_DTYPE} checkpoint in {target}")
    t0 = time.perf_counter()
    os.makedirs(cache_root, exist_ok=True)
    _remove_dead_conversions(cache_root)
    tmp = _tmp_name(target, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(source, tmp)
        _write_record(tmp, record)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException as e:  # interrupted or failed: leave no partial directory
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, (ImportError, MemoryError)):
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise GGUFError(
                f"{source}: transformers could not convert it ({type(e).__name__}: {first_line})"
            ) from e
        raise
    _say(f"converted in {time.perf_counter() - t0:.1f} s")
    return target
