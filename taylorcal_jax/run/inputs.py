"""Where a run's teacher and text come from, checked before any work, and their fingerprints.

Teacher: `teacher.path` if set (a Hugging Face checkpoint directory, or a `.gguf` file that
models/gguf.py converts once into `<workdir>/gguf/`), else `<workdir>/teacher`, written by
the `pretrain` stage from the `teacher` section.
Tokenizer: `tokenizer.path` if set, else the teacher's own (teacher.path), else a BPE trained
on the train split (data/corpus.py), which `pretrain` also saves next to the teacher.

A fingerprint is a short sha256 of what an output depends on. An external teacher's is taken
from its config.json and tokenizer files (contents) and its weight files (names, sizes and
modification times: hashing gigabytes of weights on every run would cost minutes).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os

from taylorcal_jax.errors import ConfigError
from taylorcal_jax.models.config import (
    ModelConfig,
    RopeConfig,
    UnsupportedModelError,
    family_features,
)
from taylorcal_jax.models.gguf import RECORD_FILE as GGUF_RECORD_FILE

TEACHER_DIR = "teacher"
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def digest(obj) -> str:
    """sha256 (16 hex digits) of the canonical JSON of `obj`."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_dir(config, workdir: str) -> str:
    """The teacher's checkpoint directory (a `.gguf` teacher.path converted on first use)."""
    if not config.teacher.path:
        return os.path.join(workdir, TEACHER_DIR)
    from taylorcal_jax.models import gguf  # noqa: PLC0415

    path = config.teacher.path
    try:
        return gguf.resolve_teacher_dir(path, os.path.join(workdir, gguf.WORKDIR_CACHE))
    except (gguf.CheckpointError, gguf.UnsupportedModelError) as e:
        raise ConfigError(f"teacher.path={path!r}: {e}", "see models/gguf.py") from e
    except ImportError as e:
        raise ConfigError(f"teacher.path={path!r}: {e}", gguf.INSTALL_HINT) from e


def has_tokenizer(path: str) -> bool:
    return os.path.exists(os.path.join(path, "tokenizer_config.json"))


def tokenizer_path(config, workdir: str) -> str:
    """The tokenizer directory to load, or "" to train (or reuse) the BPE of the corpus cache."""
    if config.tokenizer.path:
        return config.tokenizer.path
    tdir = teacher_dir(config, workdir)
    return tdir if has_tokenizer(tdir) else ""


def pretrained_architecture(teacher, vocab_size: int, special_ids=(None, None, None)):
    """ModelConfig of the teacher the `pretrain` stage trains (`teacher` config section).

    special_ids: the tokenizer's (bos, eos, pad) ids.
    """
    bos, eos, pad = special_ids
    return ModelConfig(
        model_type=teacher.model_type,
        vocab_size=int(vocab_size),
        hidden_size=teacher.hidden_size,
        intermediate_size=teacher.intermediate_size,
        num_hidden_layers=teacher.num_hidden_layers,
        num_attention_heads=teacher.num_attention_heads,
        num_key_value_heads=teacher.num_key_value_heads,
        head_dim=teacher.head_dim,
        rms_norm_eps=teacher.rms_norm_eps,
        max_position_embeddings=teacher.max_position_embeddings,
        rope=RopeConfig(theta=float(teacher.rope_theta)),
        tie_word_embeddings=teacher.tie_word_embeddings,
        **family_features(teacher.model_type),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def model_vocab_size(teacher, tokenizer_len: int) -> int:
    """len(tokenizer) rounded up to `teacher.vocab_multiple`."""
    m = teacher.vocab_multiple
    return -(-tokenizer_len // m) * m


# ------------------------------------------------------------------------------- checks


def _readable_dir(path: str, field: str, what: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{field}={path!r} does not exist", f"set {field} to {what}")
    if not os.path.isdir(path):
        raise ConfigError(f"{field}={path!r} is a file, not a directory", f"set {field} to {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{field}={path!r} is not readable", "check its permissions")


def check_gguf_teacher(path: str) -> None:
    """Fast checks of a `.gguf` teacher.path (no conversion); ConfigError on any problem."""
    from taylorcal_jax.models import gguf  # noqa: PLC0415

    try:
        gguf.check_gguf_file(path)
    except (gguf.CheckpointError, gguf.UnsupportedModelError) as e:
        raise ConfigError(
            f"teacher.path={path!r}: {e}", "set teacher.path to a GGUF file of a supported model"
        ) from e
    except ImportError as e:
        raise ConfigError(f"teacher.path={path!r}: {e}", gguf.INSTALL_HINT) from e


def external_teacher_architecture(config, workdir: str) -> ModelConfig:
    """Checks teacher.path (a readable checkpoint directory with weights and a tokenizer, or a
    `.gguf` file, checked fast and then converted once into the workdir's cache) and returns
    its architecture from config.json; ConfigError on any problem."""
    from taylorcal_jax.models import gguf  # noqa: PLC0415

    if gguf.is_gguf_path(config.teacher.path):
        check_gguf_teacher(config.teacher.path)
    path = teacher_dir(config, workdir)
    what = "a Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf file"
    _readable_dir(path, "teacher.path", what)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConfigError(
            f"teacher.path={path!r} has no config.json", f"set teacher.path to {what}"
        )
    if not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))
        hint = (
            "convert the pickle weights to safetensors: transformers' "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
            if bins
            else f"set teacher.path to {what}"
        )
        raise ConfigError(f"teacher.path={path!r} holds no *.safetensors weights", hint)
    try:
        arch = ModelConfig.from_json_file(cfg_path)
    except UnsupportedModelError as e:
        raise ConfigError(f"teacher.path={path!r}: {e}", "see models/config.py") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"teacher.path={path!r}: config.json is not usable ({e})") from e
    if not config.tokenizer.path and not has_tokenizer(path):
        raise ConfigError(
            f"teacher.path={path!r} has no tokenizer files (tokenizer_config.json)",
            "set tokenizer.path to the teacher's tokenizer directory",
        )
    return arch


def check_corpus(config, samples=()) -> None:
    """The `data` section: a known source kind, split fractions that leave training text, the
    read limits (data/corpus.py check_data_config), and a share of documents for the split of
    every Sample (run/plan.py) of the stages that run, which would be empty otherwise."""
    from taylorcal_jax.data import corpus, sources  # noqa: PLC0415

    try:
        corpus.check_data_config(config.data)
    except ValueError as e:
        msg = str(e) if str(e).startswith("data.") else f"data.source: {e}"
        raise ConfigError(msg) from e
    source = sources.parse_source(config.data.source)
    if source.kind == "files":
        try:
            sources.matched_files(source.args)  # a glob matching nothing fails here, not later
        except ValueError as e:
            raise ConfigError(f"data.source={config.data.source!r}: {e}") from e
    if source.kind == "hf" and not _importable("datasets"):
        raise ConfigError(
            f"data.source={config.data.source!r} needs the `datasets` package",
            "pip install 'taylorcal_jax[datasets]', or use data.source='stdlib' / 'files:<glob>'",
        )
    for s in samples:
        fraction = config.data.get(f"{s.split}_fraction")
        if fraction is not None and fraction <= 0:
            raise ConfigError(
                f"{s.what} reads the {s.split} split, but data.{s.split}_fraction={fraction} "
                "leaves it no documents",
                f"set data.{s.split}_fraction > 0",
            )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules: importing it fails
        return False


def check_samples(corpus, samples) -> None:
    """DataError (one line) for the first Sample (run/plan.py) its split cannot give: `num`
    distinct windows need num * seq_len tokens, random windows seq_len. Checked once the corpus
    is built, before the stages that cut them run (pretraining first among them)."""
    from taylorcal_jax.data.errors import DataError  # noqa: PLC0415

    for s in samples:
        size = int(corpus.stream(s.split).size)
        need = s.seq_len if s.num is None else s.num * s.seq_len
        if need > size:
            asked = f"{s.num} sequences of {s.seq_len} tokens"
            if s.num is None:
                asked = f"{s.seq_len}-token windows"
            share = (  # the train split is what the others leave
                "lower data.valid_fraction and data.test_fraction"
                if s.split == "train"
                else f"data.{s.split}_fraction"
            )
            raise DataError(
                f"{s.what}: {asked} need {need} tokens of the {s.split} split, which has {size}",
                f"ask for fewer or shorter sequences, or give the split more text (data.source, "
                f"data.max_documents, {share})",
            )


def check_tokenizer_path(config) -> None:
    if config.tokenizer.path:
        _readable_dir(config.tokenizer.path, "tokenizer.path", "a tokenizer directory")
        if not has_tokenizer(config.tokenizer.path):
            raise ConfigError(
                f"tokenizer.path={config.tokenizer.path!r} has no tokenizer_config.json",
                "set tokenizer.path to a directory written by save_pretrained",
            )
        from taylorcal_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

        try:  # (a broken one failed with a traceback inside the first stage)
            load_tokenizer(config.tokenizer.path)
        except Exception as e:  # noqa: BLE001 - whatever transformers raises for bad files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"tokenizer.path={config.tokenizer.path!r} cannot be loaded ({first})",
                "set tokenizer.path to a directory written by save_pretrained",
            ) from e


# -------------------------------------------------------------------------- fingerprints


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def directory_fingerprint(path: str) -> str:
    """Small files by contents; weight files (safetensors) by name, size and mtime. A converted
    GGUF teacher's record of its source (path, mtime) is left out: moving or touching an
    unchanged .gguf rewrites it, while the converted files stay as they were."""
    parts = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name == GGUF_RECORD_FILE:
            continue
        st = os.stat(full)
        if name.endswith(".safetensors") or st.st_size > (1 << 24):
            parts[name] = [st.st_size, st.st_mtime_ns]
        else:
            parts[name] = _file_digest(full)
    return digest(parts)


def corpus_settings(config, trains_bpe: bool) -> dict:
    """Everything the token streams depend on, apart from an external tokenizer's files: what
    data.source resolves to here (data/sources.resolved_source: a relative glob read from
    another directory is other text), the data section but for the share of undecodable bytes
    at which a run stops (a threshold: it changes no token), and the BPE's settings only where
    the BPE is trained here (`trains_bpe`: no tokenizer directory given, none with an external
    teacher)."""
    from taylorcal_jax.data import corpus, sources  # noqa: PLC0415

    data = config.data.to_dict()
    data.pop("max_undecodable_fraction")
    data["resolved_source"] = sources.resolved_source(config.data.source)
    data["token_format"] = corpus.TOKEN_FORMAT  # a new format tokenises anew: rerun
    tokenizer = config.tokenizer.to_dict()
    if not trains_bpe:
        data.pop("bpe_sample_bytes")
        tokenizer = {"path": config.tokenizer.path}
    return {"data": data, "tokenizer": tokenizer}
