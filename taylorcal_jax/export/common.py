"""What both export formats share: the error for inexpressible students, the checks that the
student's mixer is Gated DeltaNet and that every config field is one the exporter translates,
and the tokenizer copy."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from taylorcal_jax.models.mixers import gdn

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The GDN architecture fields (models/mixers/gdn.py GDNConfig) that both formats translate.
GDN_FIELDS = {"num_heads", "head_k_dim", "head_v_dim", "use_short_conv", "conv_size", "norm_eps"}


class UnsupportedExportError(ValueError):
    """The student uses a feature that the target format cannot express (the message names it)."""


def check_known_fields(config, known: set[str], target: str) -> None:
    """Raises UnsupportedExportError for a dataclass field outside `known` with a non-default
    value: a feature added to the student after this exporter, which `target` does not carry."""
    for field in dataclasses.fields(config):
        if field.name in known:
            continue
        value = getattr(config, field.name)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if default is dataclasses.MISSING or value != default:
            raise UnsupportedExportError(
                f"{type(config).__name__}.{field.name}={value!r} cannot be exported to {target}: "
                "the exporter does not translate this feature"
            )


def check_gdn_student(config, target: str) -> None:
    """UnsupportedExportError unless the student's mixer (a StudentConfig's) is Gated DeltaNet
    whose architecture uses only GDN_FIELDS."""
    if config.mixer_name != gdn.NAME:
        raise UnsupportedExportError(
            f"student mixer {config.mixer_name!r} cannot be exported to {target} "
            f"(it has softmax attention and {gdn.NAME!r} layers only)"
        )
    check_known_fields(config.mixer_config, GDN_FIELDS, target)


def has_tokenizer(path) -> bool:
    return os.path.exists(os.path.join(path, TOKENIZER_CONFIG_FILE))


def copy_tokenizer(src, dst) -> None:
    """Loads the tokenizer in `src` with transformers and saves it into `dst`."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - only when exporting

    if not has_tokenizer(src):
        raise FileNotFoundError(f"no tokenizer in {src} (no {TOKENIZER_CONFIG_FILE})")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(pathlib.Path(dst)))
