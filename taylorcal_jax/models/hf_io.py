"""Hugging Face checkpoints <-> our param pytree (safetensors only, never pickle).

Name mapping (our path -> HF tensor name; Dense/Conv kernels are stored with axes reversed,
i.e. a Linear `weight` [out, in] is our `kernel` [in, out]):

    embed_tokens/embedding            model.embed_tokens.weight
    layers_{i}/<a>/<b>/kernel         model.layers.{i}.<a>.<b>.weight   (axes reversed)
    layers_{i}/<a>/<b>/scale          model.layers.{i}.<a>.<b>.weight
    layers_{i}/<a>/<b>/bias           model.layers.{i}.<a>.<b>.bias
    layers_{i}/<a>/<leaf>             model.layers.{i}.<a>.<leaf>       (e.g. gdn/A_log)
    (layers_{i} is paths.layer_key(i); <a> a block part, e.g. a mixer's paths.mixer_key)
    norm/scale                        model.norm.weight
    lm_head/kernel                    lm_head.weight                    (untied only)

Layout on disk: `config.json` plus `model.safetensors`, or shards `model-0000k-of-0000n
.safetensors` listed in `model.safetensors.index.json` ({"metadata": {"total_size"},
"weight_map": {name: file}}), exactly as transformers writes and reads them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedModelError,
)
from taylorcal_jax.models.paths import layer_index
from taylorcal_jax.models.safetensors_io import CorruptCheckpointError, read_tensors, write_tensors
from taylorcal_jax.utils import hosts
from taylorcal_jax.utils.progress import progress

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "MissingTensorsError",
    "UnexpectedTensorsError",
    "ShapeMismatchError",
    "UnsupportedModelError",
    "load_pretrained",
    "save_pretrained",
    "path_to_hf_name",
    "read_weights",
    "write_weights",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# Buffers some older exports contain; they carry no learned weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
EMBED_NAME = "model.embed_tokens.weight"
HEAD_NAME = "lm_head.weight"

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """Base class for problems with a checkpoint directory."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path, its config.json or its weight files do not exist."""


class MissingTensorsError(CheckpointError):
    """The weight files lack tensors the config requires."""


class UnexpectedTensorsError(CheckpointError):
    """The weight files hold tensors the config does not account for."""


class ShapeMismatchError(CheckpointError):
    """Tensor shapes differ from those the config implies."""


# ------------------------------------------------------------------ names


def path_to_hf_name(path: tuple[str, ...]) -> str:
    """Our param path (tuple of keys) -> HF tensor name."""
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    *owner, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    parts = []
    for key in owner:
        layer = layer_index(key)
        parts.extend([key] if layer is None else ["layers", str(layer)])
    return "model." + ".".join([*parts, leaf])


def _is_kernel(path) -> bool:
    return path[-1] == "kernel"


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# ------------------------------------------------------------------ directory resolution


def _resolve_dir(path_or_id) -> pathlib.Path:
    p = pathlib.Path(os.path.expanduser(str(path_or_id)))
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointNotFoundError(
            f"{p} is a file; pass the checkpoint directory (holding config.json and "
            "*.safetensors) instead"
        )
    text = str(path_or_id)
    looks_like_hub_id = (
        re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None
        and not text.startswith((".", "/", "~"))
        and "/" in text
    )
    if not looks_like_hub_id:
        raise CheckpointNotFoundError(f"checkpoint directory {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise CheckpointNotFoundError(
            f"{text!r} is not a local directory, and downloading it as a Hugging Face hub id "
            f"failed ({type(e).__name__}: {e}). Without network access, download the "
            "checkpoint elsewhere and pass its local directory."
        ) from e
    return pathlib.Path(local)


def _weight_files(root: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str] | None]:
    """The weight files of a checkpoint directory, and the index's weight map when sharded.
    model.safetensors is taken before an index, as transformers does: its save_pretrained
    leaves an earlier save's index behind when it writes one file into the same directory."""
    single = root / SINGLE_FILE
    if single.exists():
        return [single], None
    index = root / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index} is not a valid safetensors index ({e!r})") from e
        files = sorted({root / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointNotFoundError(f"{index} lists shard files that are missing: {missing}")
        return files, weight_map
    others = sorted(root.glob("*.safetensors"))
    if len(others) == 1:
        return others, None
    if list(root.glob("*.bin")) or list(root.glob("*.pt")) or list(root.glob("*.pth")):
        raise CheckpointNotFoundError(
            f"{root} has only pickle weights (*.bin / *.pt), which this loader refuses to open "
            "(pickle can run arbitrary code). Convert them to safetensors with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)."
        )
    raise CheckpointNotFoundError(
        f"no weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
    )


# ------------------------------------------------------------------ loading


def read_weights(root) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (model.safetensors, or shards + index), by name.

    Arrays are read-only memory maps. Raises CheckpointNotFoundError / CorruptCheckpointError.
    """
    root = pathlib.Path(root)
    files, weight_map = _weight_files(root)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for name, arr in read_tensors(f).items():
            # the index's file names as paths ("./x.safetensors" is x.safetensors), as
            # _weight_files opened them
            if weight_map is not None and root / weight_map.get(name, "") != f:
                raise CorruptCheckpointError(
                    f"{f.name} holds {name!r} but {INDEX_FILE} maps it to {weight_map.get(name)}"
                )
            tensors[name] = arr
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CorruptCheckpointError(
                f"{INDEX_FILE} lists tensors absent from their shards: {absent[:8]}"
            )
    return tensors


def expected_shapes(
    config: ModelConfig, mixers=None, student_mixer=None
) -> dict[tuple[str, ...], tuple]:
    """Our param paths -> shapes, for the model the config (and mixers) describe."""
    from taylorcal_jax.models.teacher import init_params

    shapes = jax.eval_shape(
        lambda: init_params(
            config, jax.random.PRNGKey(0), mixers=mixers, student_mixer=student_mixer
        )
    )
    return {p: tuple(s.shape) for p, s in _flatten(shapes).items()}


def load_pretrained(path_or_id, dtype=None, *, mixers=None, student_mixer=None):
    """Loads a HF checkpoint directory -> (ModelConfig, params).

    dtype: cast every tensor to it (e.g. jnp.bfloat16); None keeps the stored dtypes.
    mixers/student_mixer: per-layer mixer names and the `StudentMixer`, for hybrid students
    saved by `save_pretrained` (default: all attention, a teacher).
    Raises CheckpointNotFoundError, CorruptCheckpointError, UnsupportedModelError,
    MissingTensorsError, UnexpectedTensorsError or ShapeMismatchError with what to fix.
    """
    root = _resolve_dir(path_or_id)
    config_path = root / "config.json"
    if not config_path.exists():
        raise CheckpointNotFoundError(f"no config.json in {root}")
    config = ModelConfig.from_json_file(config_path)
    tensors = read_weights(root)
    ignorable = {n for n in tensors if _IGNORED.search(n)}
    if config.tie_word_embeddings and _stored_head_differs(tensors):
        # transformers unties such a checkpoint (with a warning) and uses the stored head
        logger.warning(
            "%s: config.json ties the embeddings but %s differs from %s; loading it untied, "
            "as transformers does",
            root,
            HEAD_NAME,
            EMBED_NAME,
        )
        config = dataclasses.replace(config, tie_word_embeddings=False)
    if config.tie_word_embeddings:
        ignorable.add(HEAD_NAME)  # some exports store the tied copy as well
    shapes = expected_shapes(config, mixers, student_mixer)
    flat = params_from_tensors(
        root,
        tensors,
        shapes,
        ignorable=ignorable,
        dtype=dtype,
        what=f"a {config.model_type} model",
        # a teacher's stray tensors may be another family's
        hint=f"; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )
    return config, _unflatten(flat)


def _stored_head_differs(tensors) -> bool:
    """Whether the checkpoint stores an output head that is not its embedding."""
    head, embed = tensors.get(HEAD_NAME), tensors.get(EMBED_NAME)
    return head is not None and embed is not None and not np.array_equal(head, embed)


def params_from_tensors(
    root, tensors, shapes, *, ignorable=(), dtype=None, name_fn=None, what="this model", hint=""
) -> dict[tuple[str, ...], jax.Array]:
    """Our flat params {path: array} from a checkpoint's named tensors, given the param shapes
    the config implies (`expected_shapes`). name_fn: path -> tensor name (path_to_hf_name);
    dense and conv kernels are stored transposed, as torch has them. Tensors named in
    `ignorable` may be present or not; `hint` ends the error about unexpected tensors. Raises
    MissingTensorsError, UnexpectedTensorsError or ShapeMismatchError naming the first few."""
    name_fn = name_fn or path_to_hf_name
    by_name = {name_fn(p): p for p in shapes}
    missing = sorted(set(by_name) - set(tensors))
    unexpected = sorted(set(tensors) - set(by_name) - set(ignorable))
    if missing:
        raise MissingTensorsError(
            f"{root}: {len(missing)} tensors required by config.json are missing, e.g. "
            f"{missing[:8]}. Is config.json from the same model as the weights?"
        )
    if unexpected:
        raise UnexpectedTensorsError(
            f"{root}: {len(unexpected)} tensors are not part of {what} with this config, e.g. "
            f"{unexpected[:8]}{hint}"
        )
    bad = []
    for name, path in by_name.items():
        want = shapes[path][::-1] if _is_kernel(path) else shapes[path]
        if tuple(tensors[name].shape) != want:
            bad.append(f"{name}: file {tuple(tensors[name].shape)}, config implies {want}")
    if bad:
        raise ShapeMismatchError(
            f"{root}: tensor shapes do not match config.json:\n  " + "\n  ".join(bad[:8])
        )
    flat = {}
    for name, path in progress(by_name.items(), desc="loading", unit="tensor"):
        arr = tensors[name]
        if _is_kernel(path):
            arr = np.transpose(arr)
        flat[path] = jnp.asarray(arr, dtype=dtype)
    return flat


# ------------------------------------------------------------------ saving


def write_weights(
    root, tensors: dict[str, np.ndarray], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Writes named arrays as model.safetensors, or as shards + index when their total exceeds
    max_shard_bytes (the layout transformers writes); stale weight files in `root` go first."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [root / INDEX_FILE, *root.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        write_tensors(root / SINGLE_FILE, shards[0])
        return
    weight_map = {}
    n = len(shards)
    for k, shard in enumerate(progress(shards, desc="saving", unit="shard")):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        write_tensors(root / fname, shard)
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2))


def save_pretrained(
    path,
    config: ModelConfig,
    params,
    dtype=None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: dict | None = None,
) -> pathlib.Path:
    """Writes config.json + safetensors (sharded with an index when over max_shard_bytes).

    dtype: cast all tensors (e.g. jnp.bfloat16); None keeps each param's dtype.
    extra_config: additional config.json keys (e.g. a student's mixer layout).
    The result loads with `transformers.AutoModelForCausalLM.from_pretrained` (teachers).
    With several processes, params split across them are gathered first (hosts.to_host),
    so every process must call this; each writes to `path` (run/workdir.py gives processes
    other than 0 a discarded directory).
    """
    flat = _flatten(hosts.to_host(params))
    has_head = ("lm_head", "kernel") in flat
    if config.tie_word_embeddings and has_head:
        raise ValueError("config ties embeddings but params have lm_head; drop it or untie")
    if not config.tie_word_embeddings and not has_head:
        raise ValueError("config has untied embeddings but params have no lm_head/kernel")
    tensors = {}
    for p, v in flat.items():
        arr = np.asarray(v)
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        tensors[path_to_hf_name(p)] = np.transpose(arr) if _is_kernel(p) else arr
    root = pathlib.Path(path)
    write_weights(root, tensors, max_shard_bytes=max_shard_bytes)

    hf = config.to_hf_dict()
    dtypes = {str(a.dtype) for a in tensors.values()}
    stored = dtypes.pop() if len(dtypes) == 1 else "float32"
    hf["torch_dtype"] = hf["dtype"] = stored
    hf.update(extra_config or {})
    (root / "config.json").write_text(json.dumps(hf, indent=2))
    return root
