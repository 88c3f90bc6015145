"""Run the stages of a config in a workdir; a rerun skips finished stages and resumes.

    python -m taylorcal_jax.main --config=configs/tiny.py --workdir=workdirs/tiny
    python -m taylorcal_jax.main --config=configs/tiny.py:smoke --workdir=/tmp/smoke \\
        --config.pretrain.steps=20

Any config field can be set with --config.<section>.<field>=<value>; --print_config lists
every field with its value and description. The whole config is checked before any work.
A rerun in the same workdir skips the stages already done under the same settings, reruns
those whose settings or inputs changed, and resumes an interrupted one (--dry_run shows
which, and why); --rerun=STAGE[,STAGE] reruns named stages and the listed stages after
them that use their outputs.

Writes <workdir>/config.json (the history of runs), stages.json (what each stage was run
with, and its result), metrics.jsonl (one JSON object per event) and summary.md (updated
after every stage).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from taylorcal_jax.calibrate import select
from taylorcal_jax.errors import ConfigError, fail, user_errors_as_lines
from taylorcal_jax.run import fields, runner
from taylorcal_jax.stage_registry import STAGES
from taylorcal_jax.utils import interrupts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs; reruns resume in it.")
_RERUN = flags.DEFINE_list(
    "rerun", [], "Stages to run again even if done, and the listed stages that use them ('all')."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Check the config and print the plan; run nothing (a .gguf teacher is still converted, "
    "once, to read its architecture).",
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every config field with its value and description, then exit."
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of errors in the input as well.")


def run(config, workdir: str, **options) -> dict:
    """What the command line runs: `runner.run` with these STAGES; {stage: result}.

    options: command, rerun, dry_run, console (see run/runner.py). Raises UserError.
    """
    return runner.run(config, workdir, STAGES, **options)


def help_text() -> str:
    """The module docstring, then the stages, strategies and layer policies."""
    width = max(len(n) for n in STAGES)
    lines = [__doc__.rstrip(), "", "Stages (config.stages, run in the order listed):"]
    lines += [f"  {n:<{width}}  {s.summary}" for n, s in STAGES.items()]
    lines += [
        "",
        "Strategies (calibration.strategy): " + ", ".join(select.STRATEGIES),
        "Layer policies (select.policy): " + ", ".join(select.POLICIES),
        "",
    ]
    return "\n".join(lines).replace("%", "%%")  # absl substitutes %s in the usage text


def print_config(config, out=sys.stdout) -> None:
    """Every field as `section.field = value  # description`, under its section's description."""
    docs = fields.descriptions()
    section = None
    for path, value in fields.flatten(config).items():
        parent = path.rpartition(".")[0]
        if parent != section:
            section = parent
            out.write(f"\n# {parent}: {docs.get(parent, '')}\n" if parent else "")
        doc = docs.get(path, "")
        out.write(f"{path} = {value!r}" + (f"  # {doc}" if doc else "") + "\n")


# ------------------------------------------------------------------- flags, explained


def _flag_value(argv, name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config_file(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist", "e.g. --config=configs/tiny.py")
    module_spec = importlib.util.spec_from_file_location("taylorcal_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg or None) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - whatever the config file raises, in one line
        raise ConfigError(f"--config={spec}: {type(e).__name__}: {e}") from e


def explain_flag_error(argv, error: Exception) -> ConfigError:
    """One line for a flag that could not be parsed (unknown fields get a did-you-mean)."""
    spec = _flag_value(argv, "config")
    if spec is None:
        return ConfigError("--config is required", "e.g. --config=configs/tiny.py")
    config = _load_config_file(spec)
    known = set(fields.flatten(config)) | set(fields.sections(config))
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config.") :].split("=", 1)[0]
            if path not in known:
                near = fields.closest(path, known)
                return ConfigError(
                    f"unknown config field {path} (in {arg})",
                    f"did you mean --config.{near}?" if near else "--print_config lists them",
                )
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    message = message.removeprefix("flag ")
    flat = fields.flatten(config)
    for arg in argv:
        path = arg[len("--config.") :].split("=", 1)[0] if arg.startswith("--config.") else ""
        if path in flat and message.startswith(arg.split("=", 1)[0] + "="):
            kind = type(flat[path]).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            return ConfigError(f"{arg}: expected {article} {kind} ({message.split(': ', 1)[-1]})")
    return ConfigError(message, "--print_config lists the fields and their values")


def parse_flags(argv):
    """absl's flag parsing, with every failure reported as one ConfigError line."""
    try:
        parsed = flags.FLAGS(argv)
        # ml_collections reports a config file that failed to load (missing, or raising) only
        # when the config is first used, as a traceback: use it here, inside this try
        _CONFIG.value.keys()
        return parsed
    except Exception as e:  # noqa: BLE001 - flags.Error, or what loading the config raised
        try:
            error = explain_flag_error(argv, e)
        except ConfigError as inner:
            error = inner
        error.__cause__ = e  # what --debug shows
        fail(error, debug="--debug" in argv)


def main(argv):
    if len(argv) > 1:
        fail(ConfigError(f"unexpected arguments: {' '.join(argv[1:])}"), _DEBUG.value)
    given = [a for a in sys.argv[1:] if a == "--rerun" or a.startswith("--rerun=")]
    if len(given) > 1:  # absl keeps the last of a repeated flag: the others would be dropped
        fail(
            ConfigError(
                f"--rerun is given {len(given)} times", "name every stage in one --rerun=a,b"
            ),
            _DEBUG.value,
        )
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    fields.split_comma_items(config)  # --config.stages=a,b as ("a", "b")
    if _PRINT_CONFIG.value:
        try:
            print_config(config)
        except BrokenPipeError:  # the reader (`| head`) closed the pipe: nothing is lost
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if _WORKDIR.value is None:
        fail(ConfigError("--workdir is required", "e.g. --workdir=workdirs/tiny"), _DEBUG.value)
    interrupts.install()  # Ctrl-C and SIGTERM stop training at a call's end, saved
    try:
        with user_errors_as_lines(_DEBUG.value):
            run(
                config,
                _WORKDIR.value,
                command="python -m taylorcal_jax.main " + " ".join(sys.argv[1:]),
                rerun=_RERUN.value,
                dry_run=_DRY_RUN.value,
            )
    except KeyboardInterrupt:
        sys.stderr.write(interrupted_message(_RERUN.value, _WORKDIR.value))
        sys.exit(interrupts.exit_status())


def interrupted_message(rerun, workdir) -> str:
    """What to do after Ctrl-C or SIGTERM: the same command resumes, unless it holds --rerun
    and this run got as far as recording its plan (its entry in the workdir's history: the
    listed stages and their consumers are then pending or done anew), after which a plain run
    finishes the rerun and the same command would start it over, checkpoints lost."""
    import socket  # noqa: PLC0415

    from taylorcal_jax.run import workdir as workdir_lib  # noqa: PLC0415

    same = "interrupted; run the same command again to resume\n"
    if not rerun:
        return same
    try:
        last = workdir_lib.read_history(workdir)[-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # none yet, or unreadable
        return same
    if (last.get("pid"), last.get("host")) != (os.getpid(), socket.gethostname()):
        return same  # stopped before its plan was recorded: nothing was marked
    return (
        "interrupted; run the command again without --rerun to resume (with it, "
        f"{', '.join(rerun)} would start over)\n"
    )


if __name__ == "__main__":
    __doc__ = help_text()
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
