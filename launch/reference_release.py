"""The Taylor-Calibrate reference release next to our strategies: tokens out, parameters in.

The release (github.com/FutureMLS-Lab/Taylor-Calibrate, PyTorch + flash-linear-attention)
runs from a folder outside this repository; none of its code is here. This script moves token
ids out to it and its student's parameters back in, and evaluates that student with our code:

    export    the calibration and evaluation token ids this config's pipeline uses (the
              `statistics` stage's `corpus.sample(calibration.split, ...)` and the eval set
              of `eval_student` / sweep_zero_shot.py) -> <tokens_dir>/calibration_tokens.npy,
              eval_tokens.npy ([N, T] int32) and tokens.json (shapes, sha256, corpus).
    evaluate  each release student dir (its `save_pretrained` output) -> our student dir
              (`save_student`, <workdir>/reference_release/<policy>_run<k>) and its zero-shot
              perplexity next to the teacher's on the same eval tokens (checked against
              eval_tokens.npy). A policy may be given several dirs: the release seeds no
              random number generator, so repeated runs differ. With --sweep_json (one or
              more), our strategies' rows of the same (policy, kept fraction) from
              launch/sweep_zero_shot.py are put beside it (each sweep's teacher perplexity
              must equal ours, which checks that both scored the same tokens).

    python launch/reference_release.py export --config=configs/llama3_2_3b.py:/ckpt \
        --workdir=/tmp/w --tokens_dir=/tmp/w/release_tokens
    python launch/reference_release.py evaluate --config=configs/llama3_2_3b.py:/ckpt \
        --workdir=/tmp/w --tokens_dir=/tmp/w/release_tokens \
        --release_students=uniform=/tmp/rel1/init-taylor-calibrate,uniform=/tmp/rel2/... \
        --sweep_json=/tmp/w/zero_shot_x.json --notes_json=/tmp/rel/run.json --out=result.json

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
mixer as ours (taylorcal_jax/models/gdn.py: silu q/k/v, L2-normalised q/k with the d^-1/2
scale, beta = sigmoid(x Wb), g = -exp(A_log) softplus(x Wa + dt_bias), gated RMSNorm with
eps 1e-5), so every tensor maps one to one. Students with a short convolution or another
mixer are refused with the names that have no counterpart.

Shared tensors (embeddings, norms, MLPs, kept attention): the release builds its student in
bfloat16, so its copies are the teacher's rounded to bfloat16. They are checked against the
teacher (relative error <= 2^-8 per tensor); row `reference_release` then takes them from our
teacher (only the GDN mixers differ from our strategies' students); with --as_saved, row
`reference_release+as_saved` uses every tensor as the release saved it.

The release's side (in its own checkout, with the changes listed in the result file): its
converter `convert/convert_from_llama3.2.py` writes the teacher in fla's layout; then

    CALIBRATION_TOKENS_NPY=<tokens_dir>/calibration_tokens.npy python \
        src/init_ckpt_calibrated.py --cfg <yaml: teacher_model.name, student_model.name
        gdn_v4, keep_full_attention_layers, train.output_dir> --strategy taylor_calibrate \
        --hf-teacher <teacher HF dir>

writes <train.output_dir>/init-taylor-calibrate, the dir `evaluate` takes. On a machine
without network (a GPU host) carry: that checkout (code only), the wheels of
flash-linear-attention and fla-core (pure Python; torch with CUDA and triton must be there),
gguf if absent, and the teacher. There, run launch/sweep_zero_shot.py first (its rows and
the ar / ga_s2 keep sets), then `export`, the release once per keep set, and `evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
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
    f.release = flags.DEFINE_list(
        "release_students",
        [],
        "policy=<release student dir> pairs, e.g. uniform=/x/init-taylor; a policy may repeat",
    )
    f.fraction = flags.DEFINE_float("kept_fraction", 0.25, "Kept fraction of the release students.")
    f.sweeps = flags.DEFINE_list("sweep_json", [], "sweep_zero_shot.py results to put beside.")
    f.as_saved = flags.DEFINE_bool(
        "as_saved", False, "Also score each release student with every tensor as it saved them."
    )
    f.notes = flags.DEFINE_string("notes_json", None, "JSON about the release run, stored as is.")
    f.out = flags.DEFINE_string("out", None, "Result JSON (evaluate).")
    return f


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


def run_tokens(config, workdir):
    """(calibration tokens [N, T], eval tokens [N, T], corpus) exactly as the pipeline
    samples them: statistics_stage for calibration, stages.eval_sequences for evaluation."""
    from taylorcal_jax.train import stages

    corpus = stages.build_run_corpus(config, workdir)
    c = config.calibration
    cal = corpus.sample(c.split, int(c.num_sequences), int(c.seq_len), int(c.seed))
    return np.asarray(cal, np.int32), np.asarray(stages.eval_sequences(config, corpus)), corpus


def export_tokens(config, workdir: str, tokens_dir: str, provenance: dict | None = None) -> dict:
    """Writes CAL_FILE, EVAL_FILE and TOKENS_JSON (with `provenance`, e.g. the command) to
    tokens_dir; returns the JSON dict."""
    cal, ev, corpus = run_tokens(config, workdir)
    os.makedirs(tokens_dir, exist_ok=True)
    for name, arr in ((CAL_FILE, cal), (EVAL_FILE, ev.astype(np.int32))):
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
            "sha256": sha256(ev.astype(np.int32)),
            "split": config.eval.split,
            "seed": int(config.eval.seed),
        },
        "corpus": corpus_description(config, corpus),
        **(provenance or {}),
    }
    with open(os.path.join(tokens_dir, TOKENS_JSON), "w") as f:
        json.dump(info, f, indent=1)
    return info


def corpus_description(config, corpus) -> dict:
    """Source, split settings, tokenizer and a sha256 of every split's token stream."""
    from taylorcal_jax.data.corpus import tokenizer_fingerprint

    d = config.data
    return {
        "source": d.source,
        "valid_fraction": float(d.valid_fraction),
        "test_fraction": float(d.test_fraction),
        "split_seed": int(d.split_seed),
        "max_documents": int(d.max_documents),
        "tokenizer": corpus.tokenizer_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(corpus.tokenizer),
        "documents": dict(corpus.num_documents),
        "tokens": {s: int(v.size) for s, v in corpus.streams.items()},
        "stream_sha256": {s: sha256(np.asarray(v, np.int32)) for s, v in corpus.streams.items()},
    }


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


def student_params(tensors: dict[str, np.ndarray], model_config, keep, gdn_cfg):
    """Our student's Flax params from {our HF-style name: array}: the names must be exactly
    the student's, with the shapes its config implies (Linear weights [out, in])."""
    import jax.numpy as jnp

    from taylorcal_jax.models import hf_io
    from taylorcal_jax.models.student import StudentConfig

    sc = StudentConfig(model_config, tuple(keep), gdn_cfg)
    shapes = hf_io.expected_shapes(model_config, sc.mixers, gdn_cfg)
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


def import_release_student(release_dir: str, model_config, teacher_params, gdn_cfg):
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
    sc, saved = student_params(tensors, model_config, keep, gdn_cfg)
    worst = check_shared(saved, teacher_params)
    return sc, saved, with_teacher_shared(saved, teacher_params), worst


# ----------------------------------------------------------------------------- evaluate


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


def sweep_rows(sweep: dict, teacher_ppl: float, eval_tokens: int, fraction: float, policies):
    """Our strategies' rows of the sweep for these policies at this kept fraction, after
    checking that the sweep scored the same tokens (same count, same teacher perplexity)."""
    if sweep["eval_tokens"] != eval_tokens:
        raise ValueError(f"sweep scored {sweep['eval_tokens']} tokens, this run {eval_tokens}")
    if abs(sweep["teacher_ppl"] - teacher_ppl) > 1e-4 * teacher_ppl:
        raise ValueError(
            f"sweep teacher ppl {sweep['teacher_ppl']} != {teacher_ppl}: not the same tokens"
        )
    return [
        r
        for r in sweep["rows"]
        if r["policy"] in policies and abs(r["kept_fraction"] - fraction) < 1e-9
    ]


def evaluate(
    config, workdir, tokens_dir, release_students, fraction, sweeps=(), as_saved=False
) -> dict:
    """Teacher and release students' perplexity on the exported eval tokens (+ sweep rows).

    Rows `reference_release` (run k of a policy: the k-th dir given for it) and, with
    as_saved, `reference_release+as_saved`; each sweep's rows carry "sweep": its index."""
    import time

    from taylorcal_jax.calibrate import pipeline, select
    from taylorcal_jax.eval.perplexity import perplexity
    from taylorcal_jax.models.student import save_student
    from taylorcal_jax.models.teacher import Transformer

    pipeline.validate(config)
    mcfg, teacher_params, _ = pipeline._teacher_and_corpus(config, workdir)
    cal, ev, _ = run_tokens(config, workdir)
    for name, arr in ((CAL_FILE, cal), (EVAL_FILE, ev)):
        if not np.array_equal(read_exported(tokens_dir, name), arr):
            raise ValueError(f"{tokens_dir}/{name} is not what this config samples; re-export")
    gdn_cfg = pipeline.gdn_config(config, mcfg)
    bs = int(config.eval.batch_size)
    t0 = time.perf_counter()
    teacher = perplexity(Transformer(mcfg), teacher_params, ev, batch_size=bs, desc="teacher")
    rows, imports = [], []
    runs: dict[str, int] = {}
    for policy, path in release_students:
        run = runs[policy] = runs.get(policy, -1) + 1
        sc, saved, shared, worst = import_release_student(path, mcfg, teacher_params, gdn_cfg)
        expect = select.num_kept(mcfg.num_hidden_layers, fraction)
        if len(sc.keep_full_attention_layers) != expect:
            raise ValueError(
                f"{path} keeps {len(sc.keep_full_attention_layers)} layers, "
                f"{fraction} of {mcfg.num_hidden_layers} is {expect}"
            )
        out_dir = os.path.join(workdir, "reference_release", f"{policy}_run{run}")
        save_student(out_dir, sc, shared)
        imports.append(
            {
                "policy": policy,
                "release_run": run,
                "release_dir": path,
                "student_dir": out_dir,
                "shared_max_rel_diff": worst,
            }
        )
        variants = [("reference_release", shared)]
        if as_saved:
            variants.append(("reference_release+as_saved", saved))
        for label, params in variants:
            r = perplexity(sc.model(), params, ev, batch_size=bs, desc=label)
            rows.append(
                {
                    "policy": policy,
                    "kept_fraction": fraction,
                    "strategy": label,
                    "release_run": run,
                    "keep_full_attention_layers": list(sc.keep_full_attention_layers),
                    "ppl": r["ppl"],
                }
            )
            print(f"{policy} {label} run {run}: ppl {r['ppl']:.4f}", flush=True)
    policies = sorted(runs)
    ours = []
    for k, sweep in enumerate(sweeps):
        got = sweep_rows(sweep, teacher["ppl"], teacher["tokens"], fraction, policies)
        ours += [{**r, "sweep": k} for r in got]
    for policy in policies:
        keeps = {
            tuple(r["keep_full_attention_layers"]) for r in ours + rows if r["policy"] == policy
        }
        if len(keeps) > 1:
            raise ValueError(f"{policy}: the rows keep different layers {sorted(keeps)}")
    return {
        "teacher": config.teacher.path,
        "teacher_ppl": teacher["ppl"],
        "eval_tokens": teacher["tokens"],
        "eval_split": config.eval.split,
        "eval_shape": list(ev.shape),
        "eval_sha256": sha256(ev.astype(np.int32)),
        "calibration_shape": list(cal.shape),
        "calibration_sha256": sha256(cal),
        "imports": imports,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "rows": ours + rows,
    }


def main(argv, f):
    if len(argv) != 2 or argv[1] not in ("export", "evaluate"):
        raise app.UsageError("usage: reference_release.py {export|evaluate} --config=... ")
    for flag in (f.config, f.workdir, f.tokens_dir):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required")
    config, workdir, tokens_dir = f.config.value, f.workdir.value, f.tokens_dir.value
    import results_io

    from taylorcal_jax.utils import progress

    progress.set_enabled(config.progress)
    if argv[1] == "export":
        info = export_tokens(config, workdir, tokens_dir, results_io.provenance())
        print(json.dumps({k: info[k] for k in ("calibration", "eval")}, indent=1))
        return
    if f.out.value is None:
        raise app.UsageError("evaluate needs --out")
    students = parse_release_students(f.release.value)
    sweeps = [_read_json(p) for p in f.sweeps.value]
    notes = _read_json(f.notes.value)
    result = evaluate(
        config, workdir, tokens_dir, students, f.fraction.value, sweeps, f.as_saved.value
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
