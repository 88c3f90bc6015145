"""Stages, their fingerprints, and the plan of a run: which stages run, resume or are skipped.

A `Stage` declares what its result depends on: config fields or sections (`reads`, minus
`ignores`: fields that change only speed or memory, never the result beyond float rounding,
or that the config's choices leave unused; a record made with such fields too stands, see
`_made_under`),
and inputs (`inputs(config)`): other stages, and the sources "teacher" and "corpus". Its
fingerprint is

    fingerprint(S) = digest({stage: S, settings: {field: value for field in reads},
                             inputs: {input: fingerprint(input)}})

    fingerprint("teacher") = fingerprint("pretrain")                  (teacher.path unset)
                           = digest(teacher.path's files)             (teacher.path set)
    fingerprint("corpus")  = digest(data and tokenizer sections (inputs.corpus_settings: the
                                    fields that change tokens), and the files of the tokenizer
                                    directory when one is given)

so a stage's fingerprint changes exactly when a setting or an upstream output it uses
changes. `make_plan` compares each listed stage's fingerprint with the record of its last
run (workdir.py) and decides, before any work:

    skip     done before with the same fingerprint, its outputs are there, and no stage it
             uses runs in this run (one that does makes new outputs: on a GPU they differ
             in rounding even with unchanged settings)
    resume   interrupted (or failed) with the same fingerprint, and one of its checkpoint
             directories holds a finished checkpoint (utils/checkpoint.py `has_checkpoint`)
    run      never run, settings or inputs changed, outputs missing, interrupted or failed
             before its first checkpoint was finished, or asked for by --rerun (which also
             reruns the listed stages that consume the named ones; "all" names every listed
             stage), or planned to run by an earlier run that stopped before reaching it
             (status "pending": the runner marks every stage it will run before it starts the
             first, so a --rerun cut short is finished by the next plain run, and the recorded
             stages it does not list that use what it makes anew)

Inputs that are neither listed nor recorded, stages listed before the stages they consume,
and outputs with no record of the settings that made them are errors, found here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from taylorcal_jax.errors import ConfigError
from taylorcal_jax.run import inputs as inputs_lib
from taylorcal_jax.run.fields import flatten

SOURCES = ("teacher", "corpus")


class Sample(NamedTuple):
    """Token windows a stage cuts from a split: `num` distinct windows of `seq_len` tokens
    (data/packing.sample_sequences), or windows at random offsets when `num` is None
    (packing.train_batch); `what` names the config fields that ask for them."""

    what: str
    split: str
    num: int | None
    seq_len: int


def section_sample(config, section: str) -> Sample:
    """The Sample of a section with split, num_sequences and seq_len (RunContext.sequences)."""
    s = config[section]
    return Sample(section, str(s.split), int(s.num_sequences), int(s.seq_len))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline. `run(ctx) -> dict` of results (shown in the summary)."""

    name: str
    run: Callable
    summary: str  # what it does, one line
    reads: tuple[str, ...]  # config fields or sections its result depends on
    inputs: Callable[[object], tuple[str, ...]]  # stages and SOURCES it consumes
    outputs: tuple[str, ...] = ()  # workdir-relative paths it writes (removed before a run)
    checkpoints: tuple[str, ...] = ()  # workdir-relative orbax checkpoint dirs it resumes from
    # fields inside `reads` that change only speed or memory, or that the config's choices
    # leave unused (a callable of the config: e.g. the scoring text of a policy that scores
    # nothing)
    ignores: tuple[str, ...] | Callable[[object], tuple[str, ...]] = ()
    not_needed: Callable[[object], str] = lambda config: ""  # why it has nothing to do, or ""
    # check(config, teacher architecture) of the sections it reads (validate.py);
    # device_check(config, {"layers": n, "data": m}) of what depends on the devices.
    checks: tuple[Callable, ...] = ()
    device_checks: tuple[Callable, ...] = ()
    # mesh axes whose sizes shape its checkpointed state (layers padded to a multiple of the
    # "layers" axis): a checkpoint saved on other sizes cannot be resumed
    checkpoint_mesh_axes: tuple[str, ...] = ()
    # the token windows it cuts from the corpus (`Sample`s), checked once the corpus is built,
    # before any stage trains (run/inputs.check_samples)
    samples: Callable[[object], tuple[Sample, ...]] = lambda config: ()

    def settings(self, config) -> dict:
        """{field: value} of every field under `reads` not under `ignores`."""
        flat = flatten(config)
        ignores = self.ignores(config) if callable(self.ignores) else self.ignores

        def under(field, prefixes):
            return any(field == p or field.startswith(p + ".") for p in prefixes)

        return {
            k: _plain(v) for k, v in flat.items() if under(k, self.reads) and not under(k, ignores)
        }


def _made_under(rec: dict, settings: dict, deps: dict) -> bool:
    """Whether a stage's record was made with these inputs and these settings, the record
    holding these fields or more (those a stage ignores since, or ignores under this config:
    an unused policy's scoring text). Its result is then this run's, and its fingerprint
    stands for it: a newer `ignores` reruns nothing. (The same fields: a record whose
    fingerprint was carried over so, rewritten by a later run of the stage.)"""
    old = rec.get("settings", {})
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    return (
        rec.get("inputs") == deps
        and set(settings) <= set(old)
        and all(same(old[k], v) for k, v in settings.items())
    )


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass
class Step:
    """A listed stage's part in the plan."""

    name: str
    action: str  # "run" | "resume" | "skip"
    reason: str
    fingerprint: str
    settings: dict
    inputs: dict
    mesh: dict = dataclasses.field(default_factory=dict)  # the sizes of checkpoint_mesh_axes


def sections_read(stage: Stage, config) -> set[str]:
    """Top-level config sections a stage reads, its inputs' included (for validation)."""
    out = {r.split(".")[0] for r in stage.reads}
    deps = stage.inputs(config)
    if "teacher" in deps:
        out.add("teacher")
    if "corpus" in deps:
        out |= {"data", "tokenizer"}
    return out


def _describe_input_change(recorded: dict, deps: dict) -> str:
    """Which inputs differ from the record: those read now with another fingerprint (or not
    read before), and those the record read that the stage no longer reads (another setting
    switched it to other inputs, e.g. eval_student to the calibrated student)."""
    changed = [d for d in deps if recorded.get(d) != deps[d]]
    dropped = [d for d in recorded if d not in deps]
    parts = [", ".join(changed)] if changed else []
    if dropped:
        parts.append("no longer reads " + ", ".join(dropped))
    return "; ".join(parts) or "unknown"


def _describe_change(old: Mapping, new: Mapping, limit: int = 3) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "?") != new.get(k, "?")]
    parts = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def _missing_outputs(stage: Stage, workdir: str) -> list[str]:
    return [p for p in stage.outputs if not os.path.exists(os.path.join(workdir, p))]


def _has_checkpoint(stage: Stage, workdir: str) -> bool:
    """Whether a checkpoint directory of `stage` holds a finished checkpoint to resume from
    (the directory alone exists as soon as the stage starts)."""
    from taylorcal_jax.utils.checkpoint import has_checkpoint  # noqa: PLC0415 (jax, orbax)

    return any(has_checkpoint(os.path.join(workdir, p)) for p in stage.checkpoints)


def _check_resume_mesh(name: str, saved: Mapping | None, now: Mapping) -> None:
    """ConfigError before any work where a checkpoint that the stage would resume from was
    saved on mesh sizes that shape its state differently from this run's."""
    if saved and now and dict(saved) != dict(now):
        sizes = ", ".join(f"mesh.{a}={v}" for a, v in saved.items())
        raise ConfigError(
            f"stage '{name}' was interrupted with a checkpoint saved at {sizes}, which shapes "
            f"its state; this run has {', '.join(f'mesh.{a}={v}' for a, v in now.items())}",
            f"run it with {sizes} to resume, or pass --rerun={name} to restart it",
        )


def make_plan(
    config,
    workdir: str,
    registry: Mapping[str, Stage],
    records: Mapping[str, dict],
    rerun: Sequence[str] = (),
    mesh_sizes: Mapping[str, int] | None = None,
) -> list[Step]:
    """The plan of `config.stages` in `workdir` (see the module docstring); `mesh_sizes` are
    this run's ({} or None: not known, as in a dry run before the devices are counted)."""
    listed = list(config.stages)
    rerun = [s.strip() for s in rerun]
    rerun = listed if "all" in rerun else [s for s in rerun if s]  # "all" with others: all
    unknown = [s for s in rerun if s not in listed]
    if unknown:
        raise ConfigError(
            f"--rerun names {', '.join(unknown)}, which config.stages does not list",
            f"listed: {', '.join(listed)}",
        )
    fingerprints: dict[str, str] = {}
    sources: dict[str, str] = {}  # each source's fingerprint, computed once per plan
    forced = set(rerun)
    running: set[str] = set()  # listed stages that make their outputs anew in this run
    steps = []

    def source_fingerprint(name: str, consumer: str) -> str:
        if name not in sources:  # (it reads the teacher's files and lists the corpus' files)
            sources[name] = _source_fingerprint(name, consumer)
        return sources[name]

    def _source_fingerprint(name: str, consumer: str) -> str:
        if name == "teacher":
            if config.teacher.path:
                return inputs_lib.directory_fingerprint(inputs_lib.teacher_dir(config, workdir))
            return stage_fingerprint("pretrain", consumer, what="the teacher")
        # the BPE is trained here unless a tokenizer directory is given or comes with an
        # external teacher (a pretrained teacher's directory holds the BPE trained here)
        trains_bpe = not config.tokenizer.path and not (
            config.teacher.path and inputs_lib.tokenizer_path(config, workdir)
        )
        settings = inputs_lib.corpus_settings(config, trains_bpe)
        if config.tokenizer.path:
            settings["tokenizer_files"] = inputs_lib.directory_fingerprint(config.tokenizer.path)
        elif config.teacher.path:
            settings["teacher"] = source_fingerprint("teacher", consumer)
        return inputs_lib.digest(settings)

    def inputs_of(stage: Stage) -> dict[str, str]:
        return {
            dep: source_fingerprint(dep, stage.name)
            if dep in SOURCES
            else stage_fingerprint(dep, stage.name)
            for dep in stage.inputs(config)
        }

    def fingerprint(stage: Stage, deps: dict[str, str]) -> str:
        return inputs_lib.digest(
            {"stage": stage.name, "settings": stage.settings(config), "inputs": deps}
        )

    def stage_fingerprint(name: str, consumer: str, what: str = "") -> str:
        """Fingerprint of an earlier listed stage, or of the recorded outputs of an unlisted one
        (which must have been made under the current settings)."""
        if name in fingerprints:
            return fingerprints[name]
        what = what or f"the outputs of '{name}'"
        if name in listed:
            raise ConfigError(
                f"stage '{consumer}' needs {what}, but '{name}' is listed after it",
                f"order config.stages as: {', '.join(s for s in registry if s in listed)}",
            )
        hint = f"add '{name}' to config.stages"
        if name == "pretrain":
            hint += " or set teacher.path"
        rec = records.get(name)
        if rec is None or rec.get("status") != "done" or _missing_outputs(registry[name], workdir):
            raise ConfigError(f"stage '{consumer}' needs {what}; run '{name}' first", hint)
        stage = registry[name]
        deps = inputs_of(stage)
        settings = stage.settings(config)
        if fingerprint(stage, deps) != rec["fingerprint"] and not _made_under(rec, settings, deps):
            change = _describe_change(rec.get("settings", {}), settings)
            raise ConfigError(
                f"stage '{consumer}' needs {what}, which were made under other settings "
                f"({change or 'its inputs changed'})",
                hint,
            )
        fingerprints[name] = rec["fingerprint"]
        return rec["fingerprint"]

    def mesh_of(stage: Stage) -> dict:
        return {a: mesh_sizes[a] for a in stage.checkpoint_mesh_axes} if mesh_sizes else {}

    for name in listed:
        stage = registry[name]
        deps = inputs_of(stage)
        settings = stage.settings(config)
        fp = fingerprint(stage, deps)
        rec = records.get(name)
        if rec is not None and rec.get("fingerprint") != fp and _made_under(rec, settings, deps):
            fp = rec["fingerprint"]  # recorded with fields it now ignores: the same result
        fingerprints[name] = fp
        remade = [d for d in deps if made_by(config, d) in running]  # made anew in this run
        if any(made_by(config, d) in forced for d in deps):
            forced.add(name)  # --rerun also reruns the listed stages that consume its outputs
        action, reason = "run", "not run yet"
        why_not = stage.not_needed(config)
        if why_not:
            action, reason = "skip", why_not
        elif name in forced:
            reason = "--rerun" if name in rerun else "an input is rerun (--rerun)"
        elif rec is None:
            present = [
                p
                for p in stage.outputs + stage.checkpoints
                if os.path.exists(os.path.join(workdir, p))
            ]
            if present:
                raise ConfigError(
                    f"{os.path.join(workdir, present[0])} exists, but this workdir has no record "
                    f"of the settings that made it",
                    f"pass --rerun={name} to replace it, or use a fresh --workdir",
                )
        elif rec.get("fingerprint") != fp:
            change = _describe_change(rec.get("settings", {}), settings)
            if change:
                reason = f"settings changed: {change}"
            else:
                reason = f"inputs changed: {_describe_input_change(rec.get('inputs', {}), deps)}"
        elif rec.get("status") == "pending":
            reason = rec.get("pending_because", "planned by an earlier run that stopped before it")
        elif rec.get("status") == "done":
            missing = _missing_outputs(stage, workdir)
            if missing:
                reason = f"outputs missing: {', '.join(missing)}"
            elif remade:  # same settings, but not the outputs it was made from
                reason = f"an input is made again: {', '.join(remade)}"
            else:
                action, reason = "skip", "done, settings unchanged"
        else:
            why = "failed last time" if rec.get("status") == "failed" else "interrupted"
            if remade:  # its checkpoint was made from the outputs being replaced
                reason = f"{why}; an input is made again ({', '.join(remade)}): restarting"
            elif _has_checkpoint(stage, workdir):
                _check_resume_mesh(name, rec.get("mesh"), mesh_of(stage))
                action, reason = "resume", f"{why}; resuming from its checkpoint"
            else:
                reason = f"{why}; restarting"
        if action != "skip":
            running.add(name)
        steps.append(Step(name, action, reason, fp, settings, deps, mesh_of(stage)))
    return steps


def made_by(config, dep: str) -> str:
    """The stage that makes input `dep`: "pretrain" for the teacher where it trains it."""
    return "pretrain" if dep == "teacher" and not config.teacher.path else dep


def consumers(config, registry: Mapping[str, Stage], names) -> list[str]:
    """Every stage of `registry` that uses, directly or through others, the outputs of the
    stages `names`, in registry order."""
    made = set(names)
    out = []
    for name, stage in registry.items():
        deps = {made_by(config, d) for d in stage.inputs(config)}
        if name not in made and deps & made:
            made.add(name)
            out.append(name)
    return out
