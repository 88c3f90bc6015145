"""Initialisation strategies and layer policies (docs/method.md §3-5, §7), scored in parallel.

Letters: L layers, C candidates, N sequences, B batch, T time, V vocab, H heads.

Strategies (student-mixer params of a converted layer, from the teacher):

    copy, zero_gate, small_gate   naive conversions (taylorcal_jax.convert.naive)
    taylor_init                   copy + phase 1 (taylor.py; the parts calibration.phase1_parts
                                  names, by default the output gate)
    align_only                    copy + phase 2 (align.py)
    taylor_calibrate              copy + phase 1 + phase 2
    taylor_calibrate_published    copy + phase 1 with all four parts + phase 2 (the paper's)

Every phase is teacher-forced per layer, so a layer's mixer params do not depend on which
other layers are converted: `mixers_for_all_layers` computes them once for every layer, and
any keep set is then assembled by dict work (`assemble_student`). The random parts of the
`copy` init come from one key shared by all strategies, so strategies differ only in what
they calibrate.

Layer policies, for a kept fraction f of L layers (n = round(f L), at least 1):

    uniform  every (L/n)-th layer: floor(i L / n), i < n (28 layers, 25%: 0, 4, ..., 24)
    ar       remove each layer's attention alone (its mixer all zeros, so the mixer adds 0,
             as zero_gate's does; every other layer keeps attention) and measure
             perplexity; keep the n layers whose removal hurts most
    ga_s2    for each layer, a student that keeps only that layer (the strategy's init on all
             others); keep the n with the lowest zero-shot perplexity

Parallel scoring: a "union" param tree holds both the teacher's attention and the strategy's
mixer params for every layer; the one `Transformer`, called with traced keep flags `keep_l`,
uses per layer the attention output where keep_mask[l] and the student mixer's elsewhere (a
select, so exactly the student with that keep set). Candidate keep masks [C, L] are vmapped
over in groups of `parallel_candidates`, one compiled program for all candidates of all
policies. With the run's mesh, scoring is data parallel like evaluation: each device scores
its own rows of every batch (params split over "fsdp", if any, and gathered inside).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.calibrate import align as align_lib
from taylorcal_jax.calibrate import taylor as taylor_lib
from taylorcal_jax.convert.naive import NAIVE_STRATEGIES
from taylorcal_jax.eval.perplexity import token_nll_sum
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.paths import layer_mixer, with_layer_mixer
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer
from taylorcal_jax.utils import hosts, sharding
from taylorcal_jax.utils.progress import progress

STRATEGIES = (
    "copy",
    "zero_gate",
    "small_gate",
    "taylor_init",
    "align_only",
    "taylor_calibrate",
    "taylor_calibrate_published",
)
POLICIES = ("uniform", "ar", "ga_s2")
_USES_TAYLOR = ("taylor_init", "taylor_calibrate", "taylor_calibrate_published")
_USES_ALIGN = ("align_only", "taylor_calibrate", "taylor_calibrate_published")
# The published method writes all four phase-1 parts whatever calibration.phase1_parts says;
# taylor_init and taylor_calibrate write the configured ones (docs/method.md §4).
_PUBLISHED = "taylor_calibrate_published"


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    return name


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown layer policy {name!r}; choose from {POLICIES}")
    return name


def num_kept(num_layers: int, kept_fraction: float) -> int:
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    return max(1, min(num_layers, int(round(kept_fraction * num_layers))))


# --------------------------------------------------------------------------- strategies


@dataclasses.dataclass(frozen=True)
class CalibrationContext:
    """Everything a strategy needs besides the teacher params and statistics."""

    model_config: object  # ModelConfig
    mixer: StudentMixer
    consts: taylor_lib.TaylorConstants
    align_cfg: align_lib.AlignConfig
    mesh: object  # jax.sharding.Mesh with axes "layers" and "data"
    seed: int


def initial_student(strategy: str, teacher_params, stats, ctx: CalibrationContext):
    """Every layer converted under `strategy` up to (not including) phase 2.

    Returns (student params with the student mixer in every layer, report); the report holds
    phase-1 diagnostics {name: [L, H]} under "taylor" for the Taylor strategies.
    """
    check_strategy(strategy)
    layers = tuple(range(ctx.model_config.num_hidden_layers))
    sc = StudentConfig(ctx.model_config, (), ctx.mixer.config)  # every layer converted
    rng = jax.random.PRNGKey(ctx.seed)
    base = strategy if strategy in NAIVE_STRATEGIES else "copy"
    student = NAIVE_STRATEGIES[base](teacher_params, sc, rng)
    report = {}
    if strategy in _USES_TAYLOR:
        student, report["taylor"] = taylor_lib.taylor_init(
            student,
            stats,
            layers,
            model_config=ctx.model_config,
            mixer=ctx.mixer,
            consts=phase1_constants(strategy, ctx.consts),
        )
    return student, jax.device_get(report)


def aligned_student(
    strategy: str, student, stats, ctx: CalibrationContext, *, checkpoint_dir=None, log_fn=None
):
    """Phase 2 on every layer if `strategy` has it (else unchanged): (params, report).
    checkpoint_dir, log_fn: as in align.fit_layers."""
    check_strategy(strategy)
    if strategy not in _USES_ALIGN:
        return student, {}
    layers = tuple(range(ctx.model_config.num_hidden_layers))
    setup = align_lib.AlignSetup(ctx.model_config, ctx.mixer, ctx.align_cfg, ctx.mesh)
    student, metrics = align_lib.align_student(
        student, stats, layers, setup, checkpoint_dir=checkpoint_dir, log_fn=log_fn
    )
    return student, {"align": jax.device_get(metrics)}


def mixers_for_all_layers(strategy: str, teacher_params, stats, ctx: CalibrationContext):
    """Student-mixer params of every layer under `strategy`: ({layer: params}, report)."""
    student, report = initial_student(strategy, teacher_params, stats, ctx)
    student, more = aligned_student(strategy, student, stats, ctx)
    mixers = mixers_of(student, ctx.mixer.name, ctx.model_config.num_hidden_layers)
    return mixers, {**report, **more}


def mixers_of(params, name: str, num_layers: int) -> dict:
    """{layer: params of mixer `name`} of a student whose every layer has that mixer."""
    return {i: layer_mixer(params, i, name) for i in range(num_layers)}


def phase1_constants(strategy: str, consts: taylor_lib.TaylorConstants):
    """The phase-1 constants `strategy` runs with: the published parts for the published
    method, the configured ones otherwise."""
    if strategy == _PUBLISHED:
        return dataclasses.replace(consts, phase1_parts=taylor_lib.PHASE1_PARTS)
    return consts


def configurable_phase1(strategy: str) -> bool:
    """Whether calibration.phase1_parts changes what `strategy` computes."""
    return uses_phase(strategy, "taylor") and strategy != _PUBLISHED


def uses_phase(strategy: str, phase: str) -> bool:
    """Whether `strategy` runs phase "taylor" (1) or "align" (2)."""
    return strategy in {"taylor": _USES_TAYLOR, "align": _USES_ALIGN}[phase]


def assemble_student(teacher_params, mixers_by_layer, student: StudentConfig):
    """Params of `student`: the teacher's, with the given mixer params in its converted layers."""
    out = teacher_params
    for i in student.converted_layers:
        out = with_layer_mixer(out, i, student.mixer_name, mixers_by_layer[i], drop_attention=True)
    return out


def union_params(teacher_params, mixers_by_layer, name: str):
    """Teacher params with mixer `name`'s params added next to attention in every layer (the
    tree `Transformer(..., keep_l=...)` runs); `mixers_by_layer` has every layer."""
    out = teacher_params
    for i, params in mixers_by_layer.items():
        out = with_layer_mixer(out, i, name, params)
    return out


# ------------------------------------------------------------------------ candidate scoring


@functools.lru_cache(maxsize=8)
def _candidate_fn(config, mixer: StudentMixer, mesh):
    """jit(vmap over keep masks [C, L]) of (nll sums [C], token counts [C]) of the one model;
    with a mesh, data parallel over all its devices like `perplexity` (rows split, params
    placed by `sharding.param_spec` and gathered one layer at a time inside, sums added with
    psum)."""
    model = Transformer(config, student_mixer=mixer)

    def fn(model, params, masks_cl, tokens_bt, valid_bt):
        def one(keep_l):
            logits, _, _ = model.apply(
                {"params": params}, tokens_bt, valid_bt=valid_bt, keep_l=keep_l
            )
            return token_nll_sum(logits, tokens_bt, valid_bt)

        return jax.vmap(one)(masks_cl)

    if mesh is None:
        return jax.jit(functools.partial(fn, model))
    axes = tuple(mesh.axis_names)
    rows = sharding.batch_spec(mesh)

    def sharded(params, masks_cl, tokens_bt, valid_bt):
        specs = sharding.param_specs(params, mesh)
        sharded_model = model.clone(param_layout=sharding.ParamLayout.of(specs))

        def per_device(params, masks_cl, tokens_bt, valid_bt):
            sums, counts = fn(sharded_model, params, masks_cl, tokens_bt, valid_bt)
            return jax.lax.psum(sums, axes), jax.lax.psum(counts, axes)

        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(specs, sharding.P(), rows, rows),
            out_specs=(sharding.P(), sharding.P()),
            check_vma=False,
        )(params, masks_cl, tokens_bt, valid_bt)

    return jax.jit(sharded)


def score_keep_masks(
    config,
    mixer: StudentMixer,
    params,
    masks_cl,
    sequences_nt,
    *,
    batch_size: int,
    parallel: int,
    desc: str = "candidates",
    mesh=None,
):
    """Perplexity of each candidate keep mask [C, L] on [N, T] sequences -> np.ndarray [C].

    `params` is a union tree (`union_params`). Candidates are vmapped `parallel` at a time (the
    last group is padded with copies of its first mask); sequences go in batches of
    `batch_size` (with a `mesh`, rounded up to a multiple of its devices, each device scoring
    its own rows; the last batch is padded with masked rows).
    """
    masks = np.asarray(masks_cl, bool)
    seq = np.asarray(sequences_nt, np.int32)
    if masks.ndim != 2 or masks.shape[1] != config.num_hidden_layers:
        raise ValueError(f"masks must be [C, {config.num_hidden_layers}], got {masks.shape}")
    if batch_size <= 0 or parallel <= 0:
        raise ValueError("batch_size and parallel must be positive")
    fn = _candidate_fn(config, mixer, mesh)
    n, _ = seq.shape
    b = sharding.pad_to_multiple(min(batch_size, n), mesh)
    if mesh is not None:  # placed once, not per batch
        params = sharding.place_params(params, mesh)
    out = []
    groups = range(0, len(masks), parallel)
    for start in progress(groups, desc=desc, total=len(groups), unit="group"):
        group = masks[start : start + parallel]
        real = len(group)
        if real < parallel and len(masks) > parallel:
            group = np.concatenate([group, np.repeat(group[:1], parallel - real, 0)])
        nll = np.zeros(len(group))
        cnt = np.zeros(len(group))
        for s in range(0, n, b):
            tok = seq[s : s + b]
            val = np.ones(tok.shape, bool)
            if tok.shape[0] < b:
                pad = b - tok.shape[0]
                tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), np.int32)])
                val = np.concatenate([val, np.zeros((pad, tok.shape[1]), bool)])
            if mesh is not None:
                tok, val = hosts.put_slices((tok, val), sharding.batch_sharding(mesh))
            sums, counts = fn(params, jnp.asarray(group), tok, val)
            nll += np.asarray(sums, np.float64)
            cnt += np.asarray(counts, np.float64)
        out.append(np.exp(nll / cnt)[:real])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- policies


def uniform_layers(num_layers: int, kept_fraction: float) -> tuple[int, ...]:
    n = num_kept(num_layers, kept_fraction)
    return tuple(sorted({(i * num_layers) // n for i in range(n)}))


def ar_masks(num_layers: int) -> np.ndarray:
    """Candidate l: every attention layer except l (l's attention removed)."""
    return ~np.eye(num_layers, dtype=bool)


def ga_s2_masks(num_layers: int) -> np.ndarray:
    """Candidate l: only layer l keeps attention."""
    return np.eye(num_layers, dtype=bool)


def top_layers(scores_l, n: int, *, highest: bool) -> tuple[int, ...]:
    """The n layers with the highest (or lowest) scores, ties broken by layer index, sorted.
    A NaN score (a candidate whose perplexity diverged) counts as +inf: the worst perplexity,
    so kept by "ar" (removing that attention breaks the model) and never by "ga_s2"; left
    NaN, it would break the sort's order."""
    scores = np.nan_to_num(np.asarray(scores_l, np.float64), nan=np.inf)
    order = sorted(range(len(scores)), key=lambda i: ((-scores[i]) if highest else scores[i], i))
    return tuple(sorted(order[:n]))


def keep_from_scores(policy: str, scores_l, kept_fraction: float) -> tuple[int, ...]:
    """keep_full_attention_layers from per-layer candidate perplexities of `policy`."""
    n = num_kept(len(scores_l), kept_fraction)
    if policy == "ar":  # removal hurts most = highest perplexity without it
        return top_layers(scores_l, n, highest=True)
    if policy == "ga_s2":  # keeping it alone helps most = lowest perplexity
        return top_layers(scores_l, n, highest=False)
    raise ValueError(f"policy {policy!r} is not score-based (ar, ga_s2)")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerScoring:
    """What the score-based policies score on: the teacher (`config`, `teacher_params`), the
    student mixer and its params for every layer, the [N, T] sequences, and how candidates go
    (`batch_size` sequences at a time, `parallel` candidates vmapped, data parallel over `mesh`
    if given; as in `score_keep_masks`)."""

    config: object  # ModelConfig
    mixer: StudentMixer
    teacher_params: object
    mixers_by_layer: dict
    sequences_nt: object
    batch_size: int
    parallel: int
    mesh: object = None  # jax.sharding.Mesh or None


def policy_scores(policy: str, scoring: LayerScoring) -> np.ndarray:
    """Per-layer candidate perplexities [L] for `ar` (zero-gate mixers are used whatever
    `scoring.mixers_by_layer` is: removal means output 0) or `ga_s2` (the given mixers)."""
    check_policy(policy)
    n_layers = scoring.config.num_hidden_layers
    mixers, name = scoring.mixers_by_layer, scoring.mixer.name
    if policy == "ar":
        zero = {i: jax.tree.map(jnp.zeros_like, mixers[i]) for i in range(n_layers)}
        params = union_params(scoring.teacher_params, zero, name)
        masks = ar_masks(n_layers)
    elif policy == "ga_s2":
        params = union_params(scoring.teacher_params, mixers, name)
        masks = ga_s2_masks(n_layers)
    else:
        raise ValueError("uniform needs no scores")
    return score_keep_masks(
        scoring.config,
        scoring.mixer,
        params,
        masks,
        scoring.sequences_nt,
        batch_size=scoring.batch_size,
        parallel=scoring.parallel,
        desc=f"{policy} candidates",
        mesh=scoring.mesh,
    )


def choose_layers(policy: str, kept_fraction: float, scoring: LayerScoring):
    """(keep_full_attention_layers, per-layer scores or None) for one policy (`uniform` reads
    only scoring.config)."""
    check_policy(policy)
    if policy == "uniform":
        return uniform_layers(scoring.config.num_hidden_layers, kept_fraction), None
    scores = policy_scores(policy, scoring)
    return keep_from_scores(policy, scores, kept_fraction), scores


def keep_mask(keep: Sequence[int], num_layers: int) -> np.ndarray:
    """[num_layers] bool, True at the layers `keep` lists (each in 0..num_layers - 1)."""
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"kept layers {bad} are not layers of a {num_layers}-layer model")
    mask = np.zeros(num_layers, bool)
    mask[list(keep)] = True
    return mask


__all__ = [
    "POLICIES",
    "STRATEGIES",
    "CalibrationContext",
    "LayerScoring",
    "assemble_student",
    "choose_layers",
    "keep_from_scores",
    "keep_mask",
    "mixers_for_all_layers",
    "mixers_of",
    "score_keep_masks",
    "uniform_layers",
    "union_params",
]
