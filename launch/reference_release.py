"""The Taylor-Calibrate reference release next to our strategies: tokens out, parameters in.

The release (github.com/FutureMLS-Lab/Taylor-Calibrate, PyTorch + flash-linear-attention)
runs from a folder outside this repository; none of its code is here. This script moves token
ids out to it and its student's parameters back in, and evaluates that student with our code:

    export    the calibration and evaluation token ids of this config's run (RunContext's
              `calibration` and `eval` sequences, the ones sweep_zero_shot.py uses) ->
              <tokens_dir>/calibration_tokens.npy, eval_tokens.npy ([N, T] int32) and
              tokens.json (shapes, sha256, the text record of launch/run_inputs.py).
    evaluate  each release student dir (its `save_pretrained` output) -> our student dir
              (`save_student`, <workdir>/reference_release/<policy>_run<k>) and its zero-shot
              perplexity next to the teacher's on the same eval tokens (checked against
              eval_tokens.npy). A policy may be given several dirs: the release seeds no
              random number generator, so repeated runs differ. With --sweep_json (one or
              more), our strategies' rows of the same (policy, kept fraction) from
              launch/sweep_zero_shot.py are put beside it (each sweep's teacher perplexity
              must equal ours, which checks that both scored the same tokens).
    run       on a machine where the release runs (a GPU host): export, the release's teacher
              conversion, its init once per policy on the layers the sweep's `--keep_from`
              strategy keeps (taylor_calibrate; uniform and ar keep the same layers for every
              strategy), and a `reference_release` row per policy added to the sweep result,
              whose files are rewritten after each policy (`add_release_rows`).

    python launch/reference_release.py export --config=configs/smollm2_135m.py \
        --workdir=/tmp/w --tokens_dir=/tmp/w/release_tokens
    python launch/reference_release.py evaluate --config=configs/smollm2_135m.py \
        --workdir=/tmp/w --tokens_dir=/tmp/w/release_tokens \
        --release_students=uniform=/tmp/rel1/init-taylor-calibrate,uniform=/tmp/rel2/... \
        --sweep_json=/tmp/w/zero_shot_x.json --notes_json=/tmp/rel/run.json --out=result.json
    python launch/reference_release.py run --config=configs/smollm2_135m.py:<file.gguf> \
        --workdir=/tmp/w --release_code=workdirs/refrel \
        --sweep_json=launch/results/zero_shot_smollm2_135m.json   (launch/smollm2_gpu.sh)

Name mapping, release StudentForCausalLM (student "gdn_v4") -> our HF-style names (hf_io):

    model.embeddings.weight                  model.embed_tokens.weight
    model.norm.weight                        model.norm.weight
    lm_head.weight                           lm_head.weight (untied teachers only)
    model.layers.{i}.attn_norm.weight        model.layers.{i}.input_layernorm.weight
    model.layers.{i}.mlp_norm.weight         model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   (same name)
    kept layer i:      model.layers.{i}.attn.{q,k,v,o}_proj.{weight,bias}
                                             model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    converted layer i: model.layers.{i}.attn.{q,k,v,a,b,g,o}_proj.weight, .A_log, .dt_bias,
                       .o_norm.weight        model.layers.{i}.gdn.<same>

gdn_v4 is fla's GatedDeltaNet(expand_v=1, use_short_conv=False, use_gate=True), the same
mixer as ours (taylorcal_jax/models/mixers/gdn.py: silu q/k/v, L2-normalised q/k with the d^-1/2
scale, beta = sigmoid(x Wb), g = -exp(A_log) softplus(x Wa + dt_bias), gated RMSNorm with
eps 1e-5), so every tensor maps one to one. Students with a short convolution or another
mixer are refused with the names that have no counterpart.

Shared tensors (embeddings, norms, MLPs, kept attention): the release builds its student in
bfloat16, so its copies are the teacher's rounded to bfloat16. They are checked against the
teacher (relative error <= 2^-8 per tensor); row `reference_release` then takes them from our
teacher (only the GDN mixers differ from our strategies' students); with --as_saved, row
`reference_release+as_saved` uses every tensor as the release saved it.

The release's side (its checkout with the changes listed in the result files; `run` does
these steps itself): its converter `convert/convert_from_llama3.2.py` writes the teacher in
fla's layout; then

    CALIBRATION_TOKENS_NPY=<tokens_dir>/calibration_tokens.npy python \
        src/init_ckpt_calibrated.py --cfg <yaml: teacher_model.name, student_model.name
        gdn_v4, keep_full_attention_layers, train.output_dir> --strategy taylor_calibrate \
        --hf-teacher <teacher HF dir>

writes <train.output_dir>/init-taylor-calibrate, the dir `evaluate` takes. On a machine
without network (a GPU host) carry: that checkout (code only, with RELEASE_NOTES.json saying
where it came from and what was changed), the wheels of flash-linear-attention and fla-core
(pure Python; torch with CUDA and triton must be there), gguf if absent, and the teacher.
There, run launch/sweep_zero_shot.py first (its rows and the ar / ga_s2 keep sets), then
`run` (launch/smollm2_gpu.sh does both).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import types

import numpy as np
from absl import app, flags
from ml_collections import config_flags


def define_flags():
    """The command line's flags (defined on first use, so that importing this module for its
    functions leaves absl's global flags alone)."""
    f = types.SimpleNamespace()
    f.config = config_flags.DEFINE_config_file("config", None, "Config (configs/*.py[:arg]).")
    f.workdir = flags.DEFINE_string("workdir", None, "Workdir: corpus cache, imported students.")
    f.tokens_dir = flags.DEFINE_string("tokens_dir", None, "Where token ids are exported.")
    f.release_code = flags.DEFINE_string(
        "release_code", None, "run: the release's folder (its checkout with our changes)."
    )
    f.policies = flags.DEFINE_list("policies", "uniform,ar,ga_s2", "run: layer policies.")
    f.keep_from = flags.DEFINE_string(
        "keep_from", KEEP_FROM, "Sweep strategy whose kept layers the release is given."
    )
    f.release = flags.DEFINE_list(
        "release_students",
        [],
        "policy=<release student dir> pairs, e.g. uniform=/x/init-taylor; a policy may repeat",
    )
    f.fraction = flags.DEFINE_float("kept_fraction", 0.25, "Kept fraction of the release students.")
    f.sweeps = flags.DEFINE_list(
        "sweep_json", [], "sweep_zero_shot.py results to put beside (run: the one to add to)."
    )
    f.as_saved = flags.DEFINE_bool(
        "as_saved", False, "Also score each release student with every tensor as it saved them."
    )
    f.notes = flags.DEFINE_string("notes_json", None, "JSON about the release run, stored as is.")
    f.out = flags.DEFINE_string("out", None, "Result JSON (evaluate).")
    return f


STRATEGY = "reference_release"  # the release's student's label in result rows
KEEP_FROM = "taylor_calibrate"
RELEASE_INIT = "src/init_ckpt_calibrated.py"
RELEASE_CONVERTER = "convert/convert_from_llama3.2.py"
RELEASE_TEACHER_TABLE = "smollm2-135m"  # our entry in the converter's table of configs
NOTES_FILE = "RELEASE_NOTES.json"  # in the release's folder: where it came from, what changed
CAL_FILE = "calibration_tokens.npy"
EVAL_FILE = "eval_tokens.npy"
TOKENS_JSON = "tokens.json"
RELEASE_STUDENT = "gdn_v4"
BF16_RTOL = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding changes a value by <= 2^-9

GDN_TENSORS = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "a_proj.weight",
    "b_proj.weight",
    "g_proj.weight",
    "o_proj.weight",
    "A_log",
    "dt_bias",
    "o_norm.weight",
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SHARED_IN_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_ATTENTION = re.compile(r"attn\.([qkvo]_proj\.(?:weight|bias))")


class ReleaseImportError(ValueError):
    """A release student that cannot be expressed as our student (with what is wrong)."""


def sha256(array) -> str:
    """sha256 (hex) of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- export


def run_tokens(run_ctx):
    """(calibration tokens [N, T], eval tokens [N, T]) exactly as the run samples them: the
    `calibration` section for the statistics, the `eval` section for scoring (the sweep's)."""
    config = run_ctx.config
    cal = np.asarray(run_ctx.sequences(config.calibration), np.int32)
    return cal, np.asarray(run_ctx.sequences(config.eval), np.int32)


def export_tokens(run_ctx, tokens_dir: str, provenance: dict | None = None) -> dict:
    """Writes CAL_FILE, EVAL_FILE and TOKENS_JSON (with `provenance`, e.g. the command) to
    tokens_dir; returns the JSON dict."""
    import run_inputs  # launch/

    config = run_ctx.config
    cal, ev = run_tokens(run_ctx)
    os.makedirs(tokens_dir, exist_ok=True)
    for name, arr in ((CAL_FILE, cal), (EVAL_FILE, ev)):
        tmp = os.path.join(tokens_dir, name + ".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, os.path.join(tokens_dir, name))
    info = {
        "calibration": {
            "file": CAL_FILE,
            "shape": list(cal.shape),
            "sha256": sha256(cal),
            "split": config.calibration.split,
            "seed": int(config.calibration.seed),
        },
        "eval": {
            "file": EVAL_FILE,
            "shape": list(ev.shape),
            "sha256": sha256(ev),
            "split": config.eval.split,
            "seed": int(config.eval.seed),
        },
        "text": run_inputs.text_record(config, run_ctx.corpus, ev),
        **(provenance or {}),
    }
    with open(os.path.join(tokens_dir, TOKENS_JSON), "w") as f:
        json.dump(info, f, indent=1)
    return info


def read_exported(tokens_dir: str, name: str) -> np.ndarray:
    path = os.path.join(tokens_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}; run `reference_release.py export` first")
    return np.load(path)


# ----------------------------------------------------------------------------- import


def release_keep_layers(release_config: dict, num_layers: int) -> tuple[int, ...]:
    """keep_full_attention_layers of a release student config.json, after checking that its
    student mixer is the one we can express."""
    name = release_config.get("student_name")
    if name != RELEASE_STUDENT:
        raise ReleaseImportError(
            f"release student_name is {name!r}; only {RELEASE_STUDENT!r} (fla GatedDeltaNet, "
            "expand_v=1, no short conv, output gate) maps onto our GDN mixer"
        )
    if release_config.get("force_window_on_all_layers"):
        raise ReleaseImportError("release student has force_window_on_all_layers set")
    if release_config.get("num_hidden_layers") != num_layers:
        raise ReleaseImportError(
            f"release student has {release_config.get('num_hidden_layers')} layers, "
            f"the teacher {num_layers}"
        )
    return tuple(sorted(int(i) for i in release_config["keep_full_attention_layers"]))


def our_name(release_name: str, keep: set[int], tied: bool) -> str | None:
    """Our HF-style tensor name for a release tensor name; None for the tied lm_head copy.
    Raises ReleaseImportError for names without a counterpart."""
    if release_name == "model.embeddings.weight":
        return "model.embed_tokens.weight"
    if release_name == "model.norm.weight":
        return release_name
    if release_name == "lm_head.weight":
        return None if tied else release_name
    m = _LAYER.fullmatch(release_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest in _SHARED_IN_LAYER:
            return f"model.layers.{i}.{_SHARED_IN_LAYER[rest]}"
        if i in keep:
            a = _ATTENTION.fullmatch(rest)
            if a:
                return f"model.layers.{i}.self_attn.{a.group(1)}"
        elif rest.startswith("attn.") and rest[len("attn.") :] in GDN_TENSORS:
            return f"model.layers.{i}.gdn.{rest[len('attn.') :]}"
    raise ReleaseImportError(
        f"release tensor {release_name!r} has no counterpart in our student "
        f"(kept layers {sorted(keep)})"
    )


def map_release_tensors(release: dict[str, np.ndarray], keep, tied: bool):
    """{our HF-style name: array} from {release name: array}; every release tensor is mapped
    (or is the tied lm_head copy) and no name is produced twice."""
    keep = set(keep)
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for name in sorted(release):
        try:
            ours = our_name(name, keep, tied)
        except ReleaseImportError:
            unmapped.append(name)
            continue
        if ours is not None:
            out[ours] = release[name]
    if unmapped:
        raise ReleaseImportError(
            f"{len(unmapped)} release tensors have no counterpart in our student, e.g. "
            f"{unmapped[:6]} (kept layers {sorted(keep)})"
        )
    return out


def student_params(tensors: dict[str, np.ndarray], model_config, keep, mixer):
    """Our student's Flax params from {our HF-style name: array}: the names must be exactly
    those of the student with `mixer` (a GDN `StudentMixer`) in the layers not kept, with the
    shapes its config implies (Linear weights [out, in])."""
    import jax.numpy as jnp

    from taylorcal_jax.models import hf_io
    from taylorcal_jax.models.student import StudentConfig

    if mixer.name != "gdn":
        raise ReleaseImportError(f"the release's student maps onto GDN only, not {mixer.name!r}")
    sc = StudentConfig(model_config, tuple(keep), mixer.config)
    shapes = hf_io.expected_shapes(model_config, sc.mixers, mixer)
    by_name = {hf_io.path_to_hf_name(p): p for p in shapes}
    missing = sorted(set(by_name) - set(tensors))
    extra = sorted(set(tensors) - set(by_name))
    if missing or extra:
        raise ReleaseImportError(
            f"release student does not match ours: missing {missing[:6]}, extra {extra[:6]}"
        )
    params: dict = {}
    bad = []
    for name, path in by_name.items():
        kernel = path[-1] == "kernel"
        want = shapes[path][::-1] if kernel else shapes[path]
        arr = np.asarray(tensors[name], np.float32)
        if arr.shape != want:
            bad.append(f"{name}: release {arr.shape}, ours {want}")
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(arr.T if kernel else arr)
    if bad:
        raise ReleaseImportError("shape mismatch:\n  " + "\n  ".join(bad[:8]))
    return sc, params


def check_shared(release_params, teacher_params, rtol: float = BF16_RTOL) -> float:
    """Largest relative (per tensor, max-norm) difference between the release's copies of the
    teacher's tensors and the teacher's; raises if one exceeds rtol (a different teacher)."""
    import jax

    worst = 0.0
    flat_t = dict(jax.tree_util.tree_flatten_with_path(teacher_params)[0])
    for path, r in jax.tree_util.tree_flatten_with_path(release_params)[0]:
        if any(getattr(k, "key", None) == "gdn" for k in path):
            continue
        t = np.asarray(flat_t[path], np.float32)
        err = float(np.max(np.abs(np.asarray(r, np.float32) - t)) / max(np.max(np.abs(t)), 1e-30))
        worst = max(worst, err)
        if err > rtol:
            raise ReleaseImportError(
                f"release tensor {jax.tree_util.keystr(path)} differs from the teacher's by "
                f"{err:.2e} (relative), more than bfloat16 rounding ({rtol:.1e}): is it the "
                "same teacher?"
            )
    return worst


def with_teacher_shared(release_params, teacher_params):
    """The release's GDN mixers on the teacher's own (full precision) shared tensors."""
    out = {}
    for key, value in release_params.items():
        if isinstance(value, dict) and "gdn" in value:
            out[key] = {**teacher_params[key], "gdn": value["gdn"]}
            out[key].pop("self_attn", None)
        else:
            out[key] = teacher_params[key]
    return out


def import_release_student(release_dir: str, model_config, teacher_params, mixer):
    """Release student dir -> (StudentConfig, params as saved, params on the teacher's shared
    tensors, largest relative difference of the shared copies)."""
    from taylorcal_jax.models.safetensors_io import read_tensors

    with open(os.path.join(release_dir, "config.json")) as f:
        release_config = json.load(f)
    keep = release_keep_layers(release_config, model_config.num_hidden_layers)
    files = sorted(f for f in os.listdir(release_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {release_dir}")
    release: dict[str, np.ndarray] = {}
    for f in files:
        release.update(read_tensors(os.path.join(release_dir, f)))
    tensors = map_release_tensors(release, keep, model_config.tie_word_embeddings)
    sc, saved = student_params(tensors, model_config, keep, mixer)
    worst = check_shared(saved, teacher_params)
    return sc, saved, with_teacher_shared(saved, teacher_params), worst


# ----------------------------------------------------------------------------- evaluate


def load_run(config, workdir, tokens_dir=None):
    """The validated run's teacher, GDN student mixer and tokens, loaded once. With
    tokens_dir, the exported token ids must be what this config samples."""
    from taylorcal_jax.calibrate import pipeline
    from taylorcal_jax.run import validate
    from taylorcal_jax.run.context import RunContext
    from taylorcal_jax.stage_registry import STAGES

    validate.validate(config, STAGES, workdir)
    run_ctx = RunContext(config, workdir)
    mcfg, params = run_ctx.teacher
    cal, ev = run_tokens(run_ctx)
    if tokens_dir is not None:
        for name, arr in ((CAL_FILE, cal), (EVAL_FILE, ev)):
            if not np.array_equal(read_exported(tokens_dir, name), arr):
                raise ValueError(f"{tokens_dir}/{name} is not what this config samples; re-export")
    return types.SimpleNamespace(
        ctx=run_ctx,
        mcfg=mcfg,
        params=params,
        mixer=pipeline.student_mixer(config, mcfg),
        cal=cal,
        ev=ev,
        batch_size=int(config.eval.batch_size),
    )


def teacher_perplexity(run) -> dict:
    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.teacher import Transformer

    return perplexity(
        Transformer(run.mcfg), run.params, run.ev, batch_size=run.batch_size, desc="teacher"
    )


def score_release_student(run, policy, path, release_run, fraction, as_saved=False):
    """Imports one release student dir, saves it as ours under
    <workdir>/reference_release/<policy>_run<k> and scores it on the eval tokens with the
    run's GDN runtime options; returns (import record, rows)."""
    from taylorcal_jax.calibrate import select
    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.student import save_student

    sc, saved, shared, worst = import_release_student(path, run.mcfg, run.params, run.mixer)
    expect = select.num_kept(run.mcfg.num_hidden_layers, fraction)
    if len(sc.keep_full_attention_layers) != expect:
        raise ValueError(
            f"{path} keeps {len(sc.keep_full_attention_layers)} layers, "
            f"{fraction} of {run.mcfg.num_hidden_layers} is {expect}"
        )
    out_dir = run.ctx.path("reference_release", f"{policy}_run{release_run}")
    save_student(out_dir, sc, shared)
    record = {
        "policy": policy,
        "release_run": release_run,
        "release_dir": path,
        "student_dir": out_dir,
        "shared_max_rel_diff": worst,
    }
    variants = [(STRATEGY, shared)]
    if as_saved:
        variants.append((STRATEGY + "+as_saved", saved))
    rows = []
    model = sc.model(runtime=run.mixer.runtime)
    for label, params in variants:
        r = perplexity(model, params, run.ev, batch_size=run.batch_size, desc=label)
        rows.append(
            {
                "policy": policy,
                "kept_fraction": fraction,
                "strategy": label,
                "release_run": release_run,
                "keep_full_attention_layers": list(sc.keep_full_attention_layers),
                "ppl": r["ppl"],
            }
        )
        print(f"{policy} {label} run {release_run}: ppl {r['ppl']:.4f}", flush=True)
    return record, rows


def parse_release_students(pairs) -> list[tuple[str, str]]:
    """[(policy, release student dir)] from "<policy>=<dir>" entries; a policy may repeat
    (several runs of the release, which seeds no random number generator)."""
    from taylorcal_jax.calibrate import select

    out = []
    for pair in pairs:
        policy, sep, path = pair.partition("=")
        if not sep or not path:
            raise ValueError(f"--release_students entry {pair!r}: use <policy>=<dir>")
        select.check_policy(policy)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"release student dir {path} does not exist")
        out.append((policy, path))
    if not out:
        raise ValueError("--release_students is empty")
    return out


def check_same_tokens(sweep: dict, teacher_ppl: float, eval_tokens: int) -> None:
    """A sweep result scored the same tokens: same count, same teacher perplexity."""
    if sweep["eval_tokens"] != eval_tokens:
        raise ValueError(f"sweep scored {sweep['eval_tokens']} tokens, this run {eval_tokens}")
    if abs(sweep["teacher_ppl"] - teacher_ppl) > 1e-4 * teacher_ppl:
        raise ValueError(
            f"sweep teacher ppl {sweep['teacher_ppl']} != {teacher_ppl}: not the same tokens"
        )


def sweep_rows(sweep: dict, teacher_ppl: float, eval_tokens: int, fraction: float, policies):
    """Our strategies' rows of the sweep for these policies at this kept fraction, after
    checking that the sweep scored the same tokens (same count, same teacher perplexity)."""
    check_same_tokens(sweep, teacher_ppl, eval_tokens)
    return [
        r
        for r in sweep["rows"]
        if r["policy"] in policies and abs(r["kept_fraction"] - fraction) < 1e-9
    ]


def sweep_keep(rows, policy: str, fraction: float, keep_from: str) -> tuple[int, ...] | None:
    """The layers strategy `keep_from` keeps under `policy` at `fraction` in sweep rows (the
    ones the release is given: uniform and ar keep the same layers for every strategy, ga_s2
    ranks layers with each strategy's own init); None when the rows lack it."""
    for r in rows:
        if (
            r["strategy"] == keep_from
            and r["policy"] == policy
            and abs(r["kept_fraction"] - fraction) < 1e-9
        ):
            return tuple(r["keep_full_attention_layers"])
    return None


def evaluate(
    config,
    workdir,
    tokens_dir,
    release_students,
    fraction,
    sweeps=(),
    as_saved=False,
    keep_from=KEEP_FROM,
) -> dict:
    """Teacher and release students' perplexity on the exported eval tokens (+ sweep rows).

    Rows `reference_release` (run k of a policy: the k-th dir given for it) and, with
    as_saved, `reference_release+as_saved`; each sweep's rows carry "sweep": its index. A
    release student must keep the layers `keep_from` keeps in the sweeps (when they hold it).
    """
    run = load_run(config, workdir, tokens_dir)
    t0 = time.perf_counter()
    teacher = teacher_perplexity(run)
    rows, imports = [], []
    runs: dict[str, int] = {}
    for policy, path in release_students:
        release_run = runs[policy] = runs.get(policy, -1) + 1
        record, got = score_release_student(run, policy, path, release_run, fraction, as_saved)
        imports.append(record)
        rows += got
    policies = sorted(runs)
    ours = []
    for k, sweep in enumerate(sweeps):
        got = sweep_rows(sweep, teacher["ppl"], teacher["tokens"], fraction, policies)
        ours += [{**r, "sweep": k} for r in got]
    for r in rows:
        want = sweep_keep(ours, r["policy"], fraction, keep_from)
        if want is not None and tuple(r["keep_full_attention_layers"]) != want:
            raise ValueError(
                f"{r['policy']}: the release keeps {r['keep_full_attention_layers']}, "
                f"{keep_from} in the sweep {list(want)}"
            )
    return {
        "teacher": config.teacher.path,
        "teacher_ppl": teacher["ppl"],
        "eval_tokens": teacher["tokens"],
        "eval_split": config.eval.split,
        "eval_shape": list(run.ev.shape),
        "eval_sha256": sha256(run.ev),
        "calibration_shape": list(run.cal.shape),
        "calibration_sha256": sha256(run.cal),
        "imports": imports,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "rows": ours + rows,
    }


# ----------------------------------------------------------------------------- run (GPU)


def release_yaml(teacher_fla: str, keep, output_dir: str) -> str:
    """The release's init config (its YAML keys) for one keep set."""
    import yaml

    return yaml.safe_dump(
        {
            "teacher_model": {"name": teacher_fla},
            "student_model": {
                "name": RELEASE_STUDENT,
                "keep_full_attention_layers": [int(i) for i in keep],
            },
            "train": {"output_dir": output_dir},
        },
        sort_keys=False,
    )


def run_release_command(code_dir: str, argv, log_path: str, env_extra: dict) -> None:
    """Runs one of the release's scripts from its folder (its src/ first on PYTHONPATH),
    echoing its output line by line and keeping it in log_path; raises on failure."""
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(code_dir, "src"), code_dir] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_extra)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=code_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            log.write(line)
            print("  [release] " + line, end="", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"release command {argv[0]} failed ({proc.returncode}): {log_path}")


def code_record(code_dir: str) -> dict:
    """What release code ran: sha256 of its .py files (path and bytes) and its notes file."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(code_dir)):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git", "results"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, code_dir).encode() + b"\n")
            with open(path, "rb") as f:
                h.update(f.read())
    record = {"folder": code_dir, "py_sha256": h.hexdigest()}
    notes = os.path.join(code_dir, NOTES_FILE)
    if os.path.exists(notes):
        record["notes"] = _read_json(notes)
    return record


# what each import record keeps of the run that made it (results_io.provenance's keys)
IMPORT_PROVENANCE = ("device", "date", "command", "git")


def add_release_rows(
    config,
    workdir,
    code_dir,
    sweep_json,
    policies,
    fraction=0.25,
    keep_from=KEEP_FROM,
    teacher_table=RELEASE_TEACHER_TABLE,
) -> dict:
    """The release's own init, once per policy, on the sweep's keep sets, scored beside the
    sweep's rows: strategy `reference_release` rows are added to the sweep result, whose
    files (sweep_zero_shot.write_outputs) are rewritten after every policy.

    Steps, each skipped when its output is complete (a rerun resumes): export the
    calibration / eval token ids to <workdir>/reference_release/tokens; the release's
    converter writes the teacher (its HF checkpoint dir, a converted .gguf included) in fla's
    layout; per policy, src/init_ckpt_calibrated.py --strategy taylor_calibrate (300
    alignment steps, its default) with CALIBRATION_TOKENS_NPY = our calibration tokens."""
    import results_io
    import sweep_zero_shot

    from taylorcal_jax.calibrate import select

    for policy in policies:
        select.check_policy(policy)
    for script in (RELEASE_INIT, RELEASE_CONVERTER):
        if not os.path.exists(os.path.join(code_dir, script)):
            raise FileNotFoundError(f"{code_dir}/{script} missing: is it the release's folder?")
    sweep = _read_json(sweep_json)
    keeps = {p: sweep_keep(sweep["rows"], p, fraction, keep_from) for p in policies}
    lacking = sorted(p for p, k in keeps.items() if k is None)
    if lacking:
        raise ValueError(f"{sweep_json} has no {keep_from} rows at {fraction} for {lacking}")
    log = results_io.progress_log()

    run = load_run(config, workdir)
    base = run.ctx.path("reference_release")
    tokens_dir = os.path.join(base, "tokens")
    info = export_tokens(run.ctx, tokens_dir, results_io.provenance())
    teacher = teacher_perplexity(run)
    check_same_tokens(sweep, teacher["ppl"], teacher["tokens"])
    log(f"tokens exported, teacher ppl {teacher['ppl']:.3f} equals the sweep's")
    hf_teacher = run.ctx.teacher_dir
    teacher_fla = os.path.join(base, "teacher_fla")
    if not os.path.exists(os.path.join(teacher_fla, "config.json")):
        argv = [RELEASE_CONVERTER, "--model", hf_teacher, "--config", teacher_table]
        run_release_command(
            code_dir, argv + ["--output", teacher_fla + ".tmp"], teacher_fla + ".log", {}
        )
        os.replace(teacher_fla + ".tmp", teacher_fla)
    log(f"teacher in fla's layout: {teacher_fla}")
    env = {"CALIBRATION_TOKENS_NPY": os.path.join(tokens_dir, CAL_FILE)}
    # a run for some policies keeps the import records of the others (their rows stay too)
    earlier = sweep.get("reference_release", {}).get("imports", [])
    sweep["reference_release"] = {
        "code": code_record(code_dir),
        "entry_point": f"{RELEASE_INIT} --strategy taylor_calibrate",
        "keep_from": keep_from,
        "tokens": info,
        "imports": [r for r in earlier if r["policy"] not in policies],
    }
    for policy in policies:
        out = os.path.join(base, f"release_{policy}")
        if not os.path.exists(os.path.join(out, "config.json")):
            cfg_path = os.path.join(base, f"release_{policy}.yaml")
            with open(cfg_path, "w") as f:
                f.write(release_yaml(teacher_fla, keeps[policy], out + ".tmp"))
            argv = [RELEASE_INIT, "--cfg", cfg_path, "--strategy", "taylor_calibrate"]
            argv += ["--hf-teacher", hf_teacher, "--output", out + ".tmp"]
            t1 = time.perf_counter()
            run_release_command(code_dir, argv, out + ".log", env)
            os.replace(out + ".tmp", out)
            log(f"{policy}: release init in {time.perf_counter() - t1:.0f} s")
        record, rows = score_release_student(run, policy, out, 0, fraction)
        # each import keeps the run that made it: a later run for other policies replaces
        # `tokens` (with its own device, command and date) but keeps this record
        record = {**record, **{k: info[k] for k in IMPORT_PROVENANCE}}
        sweep["rows"] = [
            r for r in sweep["rows"] if not (r["strategy"] == STRATEGY and r["policy"] == policy)
        ] + rows
        sweep["reference_release"]["imports"].append(record)
        sweep_zero_shot.write_outputs(sweep, os.path.dirname(sweep_json), sweep["teacher_name"])
        log(f"{policy}: {STRATEGY} ppl {rows[0]['ppl']:.3f} added to {sweep_json}")
    return sweep


# ----------------------------------------------------------------------------- command line


def main(argv, f):
    if len(argv) != 2 or argv[1] not in ("export", "evaluate", "run"):
        raise app.UsageError("usage: reference_release.py {export|evaluate|run} --config=... ")
    for flag in (f.config, f.workdir):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required")
    config, workdir = f.config.value, f.workdir.value
    import results_io

    from taylorcal_jax.utils import progress

    progress.set_enabled(config.progress)
    if argv[1] == "run":
        if f.release_code.value is None or len(f.sweeps.value) != 1:
            raise app.UsageError("run needs --release_code and one --sweep_json")
        add_release_rows(
            config,
            workdir,
            os.path.abspath(f.release_code.value),
            f.sweeps.value[0],
            f.policies.value,
            f.fraction.value,
            f.keep_from.value,
        )
        return
    if f.tokens_dir.value is None:
        raise app.UsageError("--tokens_dir is required")
    tokens_dir = f.tokens_dir.value
    if argv[1] == "export":
        from taylorcal_jax.run.context import RunContext

        info = export_tokens(RunContext(config, workdir), tokens_dir, results_io.provenance())
        print(json.dumps({k: info[k] for k in ("calibration", "eval")}, indent=1))
        return
    if f.out.value is None:
        raise app.UsageError("evaluate needs --out")
    students = parse_release_students(f.release.value)
    sweeps = [_read_json(p) for p in f.sweeps.value]
    notes = _read_json(f.notes.value)
    result = evaluate(
        config,
        workdir,
        tokens_dir,
        students,
        f.fraction.value,
        sweeps,
        f.as_saved.value,
        f.keep_from.value,
    )
    result = {
        **results_io.provenance(),
        **result,
        "tokens": _read_json(os.path.join(tokens_dir, TOKENS_JSON)),
    }
    keys = ("command", "date", "device", "calibration", "total_seconds", "per_strategy")
    result["sweeps"] = [{k: sweep.get(k) for k in keys} for sweep in sweeps]
    if notes is not None:
        result["reference_release"] = notes
    os.makedirs(os.path.dirname(os.path.abspath(f.out.value)), exist_ok=True)
    with open(f.out.value, "w") as fh:
        json.dump(result, fh, indent=1)
    for r in result["rows"]:
        print(f"{r['policy']:8s} {r['strategy']:28s} {r['ppl']:.4f}")
    print(f"teacher ppl {result['teacher_ppl']:.4f} on {result['eval_tokens']} tokens")
    print("wrote", f.out.value)


def _read_json(path):
    if path is None:
        return None
    with open(path) as fh:
        return json.load(fh)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _flags = define_flags()
    app.run(lambda argv: main(argv, _flags))
