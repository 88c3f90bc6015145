"""Command line: export a student directory for serving.

    python -m taylorcal_jax.export --student=workdirs/tiny/student --out=exports/tiny
    python -m taylorcal_jax.export --student=DIR --out=DIR --format=fla --dtype=bfloat16

--format=hf (default): a transformers model with its own modelling code (export/hf_torch.py);
--format=fla: flash-linear-attention's GatedDeltaNetForCausalLM (export/fla_format.py), for the
students that fit it. The tokenizer comes from the student directory, or --tokenizer=DIR.
Everything that can be checked is checked before the weights are read; the export is written to
a directory of its own beside <out> (.<name>.<random>.tmp) and renamed to <out> once complete,
so an interrupted run leaves no partial model (and a run killed outright leaves that directory,
which the next export to <out> removes).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile

from taylorcal_jax.export import common, fla_format, hf_torch
from taylorcal_jax.models.student import STUDENT_CONFIG_FILE, load_student, read_student_config

FORMATS = {
    "hf": (hf_torch.check_exportable, hf_torch.write_hf_model),
    "fla": (fla_format.check_fla_exportable, fla_format.write_fla_model),
}
DTYPES = ("float32", "bfloat16")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m taylorcal_jax.export", description=__doc__)
    p.add_argument("--student", required=True, help="student directory (student_config.json)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--format", choices=sorted(FORMATS), default="hf")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: as stored")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --student)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def check(args) -> None:
    """Every check that needs no weights; raises ValueError / FileNotFoundError (one line)."""
    out = os.path.realpath(args.out)  # what export() replaces (through links and ..)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={args.out} is a file; name a directory")
    if os.path.exists(out) and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    for name in ("student", "tokenizer"):
        source = getattr(args, name)
        if source is not None and _within(os.path.realpath(source), out):
            raise ValueError(
                f"--out={args.out} holds --{name}={source}, which replacing --out would delete"
            )
    writable = _nearest_existing(os.path.dirname(out))
    if not os.path.isdir(writable):
        raise ValueError(f"--out={args.out} lies under {writable}, which is a file")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {writable} (for --out={args.out})")
    config = read_student_config(os.path.join(args.student, STUDENT_CONFIG_FILE))
    FORMATS[args.format][0](config)
    if args.tokenizer is not None and not common.has_tokenizer(args.tokenizer):
        raise FileNotFoundError(f"no tokenizer in {args.tokenizer}")


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def export(args, config, params) -> str:
    """Writes the export of the student (config, params) (module docstring); returns its
    directory."""
    tokenizer = args.tokenizer or args.student
    if not common.has_tokenizer(tokenizer):
        print(
            f"warning: no tokenizer in {args.student}; the export has none (pass --tokenizer=DIR)",
            file=sys.stderr,
        )
        tokenizer = None
    out = os.path.realpath(args.out)  # one path for the directory beside it and the rename
    parent, prefix = os.path.dirname(out), f".{os.path.basename(out)}."
    os.makedirs(parent, exist_ok=True)
    # mkdtemp's names: the prefix, 8 characters of its alphabet, the suffix (so not those of an
    # export to another --out whose name starts the same, e.g. <out>.v2)
    left = glob.escape(prefix) + "[a-z0-9_]" * 8 + ".tmp"
    for stale in glob.glob(os.path.join(glob.escape(parent), left)):
        shutil.rmtree(stale, ignore_errors=True)  # of an export to --out killed outright
    # a directory of its own (never one a user made), renamed to --out at the end
    tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as a plain mkdir makes it (mkdtemp's is owner-only)
        FORMATS[args.format][1](tmp, config, params, args.dtype)
        if tokenizer is not None:
            common.copy_tokenizer(tokenizer, tmp, config.teacher)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:  # failed or interrupted: no half-written export left beside --out
        shutil.rmtree(tmp, ignore_errors=True)
    return args.out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check(args)
        config, params = load_student(args.student)  # missing weights: one line too
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(export(args, config, params))
    except OSError as e:  # a full disk, a directory made read-only meanwhile: nothing is left
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
