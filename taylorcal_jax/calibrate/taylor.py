"""Taylor-Calibrate phase 1: teacher statistics -> GDN parameters in closed form.

docs/method.md §4.

Letters: N sequences, T time, H heads, K key dim, V value dim, D hidden, L converted layers.

Per converted layer, from the teacher's mean attention distance D_h and entropy E_h and the
teacher-forced input x and context C (pre-o_proj, one block per query head):

    decay        A_log_h = 0,  dt_bias_h = softplus^-1(gamma_h),
                 gamma_h = clip(ln 2 / D_h, gamma_min, gamma_max)
                 (with x Wa = 0 the per-token decay is exp(-gamma_h): half-life D_h tokens);
                 Wa is multiplied by `a_proj_scale` (0 makes x Wa = 0 exactly).
    write gate   c_h = 1 - (E_h - min E) / max(max E - min E, entropy_span_floor),
                 beta_h = beta_min + beta_span c_h      (sharper heads write harder)
        "release":        each column w_h of Wb (a random init) rescaled to
                          mean|w_h| = logit(beta_h) / sqrt(D), sign included (the public
                          release; sigmoid(x Wb) then stays centred near 0.5, not at beta_h)
        "mean_direction": w_h = logit(beta_h) mu / |mu|^2 with mu the mean of x over the
                          calibration tokens, so that mu . w_h = logit(beta_h): the gate is
                          centred at beta_h for inputs near their mean (our improvement)
    value scale  O = GDN recurrence output (pre-norm) with these gates on x;
                 sigma_h = <C_h, O_h> / <O_h, O_h> over valid tokens, clipped to
                 [sigma_min, sigma_max]; the columns of Wv for head h are multiplied by sigma_h
    output gate  Wg = alpha Wv (scaled),  alpha = gate_damping rms(C) / rms(silu(x Wv))

`phase1_parts` (configs/common.py, calibration.phase1_parts; default the output gate alone, all
four being the published method, `taylor_calibrate_published`) names the parts written into the
params; the others keep the input's (e.g. `copy`)
values. Each part writes only its own parameters:

    decay        A_log, dt_bias, a_proj
    write_gate   b_proj
    value_scale  v_proj
    output_gate  g_proj

Later parts see the earlier ones as applied: sigma is fitted with whichever gates are in the
params, and Wg is alpha times the Wv in the params. Diagnostics report what phase 1 computes
(targets, fitted sigma, alpha) whether or not a part is applied.

`calibrate_layer` is the pure per-layer map; `taylor_init` applies it to a student's params,
one layer at a time through a single compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from taylorcal_jax.calibrate.stacking import check_mixers
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.mixers.gdn import NAME as GDN
from taylorcal_jax.models.mixers.gdn import softplus_inverse
from taylorcal_jax.models.paths import layer_mixer, with_layer_mixer

WRITE_GATE_RULES = ("release", "mean_direction")
PHASE1_PARTS = ("decay", "write_gate", "value_scale", "output_gate")


@dataclasses.dataclass(frozen=True)
class TaylorConstants:
    """Calibration constants (configs/common.py, section `calibration`)."""

    gamma_min: float
    gamma_max: float
    beta_min: float
    beta_span: float
    entropy_span_floor: float
    sigma_min: float
    sigma_max: float
    gate_damping: float
    write_gate: str
    a_proj_scale: float
    phase1_parts: tuple[str, ...] = PHASE1_PARTS  # all four: the published method

    def __post_init__(self):
        parts = self.phase1_parts
        if isinstance(parts, str) or len(set(parts)) != len(parts) or set(parts) - {*PHASE1_PARTS}:
            raise ValueError(
                f"calibration.phase1_parts must be a tuple of distinct parts from {PHASE1_PARTS}, "
                f"got {parts!r}"
            )
        object.__setattr__(self, "phase1_parts", tuple(p for p in PHASE1_PARTS if p in parts))
        if self.write_gate not in WRITE_GATE_RULES:
            raise ValueError(
                f"calibration.write_gate must be one of {WRITE_GATE_RULES}, got {self.write_gate!r}"
            )
        if not 0 < self.gamma_min <= self.gamma_max:
            raise ValueError("need 0 < gamma_min <= gamma_max")
        if not (0 < self.beta_min and self.beta_min + self.beta_span < 1 and self.beta_span >= 0):
            raise ValueError("beta targets must lie in (0, 1): check beta_min and beta_span")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError("need 0 < sigma_min <= sigma_max")
        if not self.entropy_span_floor > 0:  # the write gate divides by the entropy range
            raise ValueError(f"entropy_span_floor must be > 0, got {self.entropy_span_floor}")
        for name in ("gate_damping", "a_proj_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg) -> TaylorConstants:
        """From the `calibration` ConfigDict section (every field required)."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def _masked_mean(x, w, axes):
    return jnp.sum(x * w, axis=axes) / jnp.maximum(jnp.sum(w * jnp.ones_like(x), axis=axes), 1.0)


def decay_params(distance_h, consts: TaylorConstants):
    """(A_log_h, dt_bias_h, gamma_h): half-life of D_h tokens with x Wa = 0."""
    gamma = jnp.clip(math.log(2.0) / distance_h, consts.gamma_min, consts.gamma_max)
    return jnp.zeros_like(gamma), softplus_inverse(gamma), gamma


def beta_targets(entropy_h, consts: TaylorConstants):
    """beta_h = beta_min + beta_span * concentration_h (concentration 1 = sharpest head)."""
    lo, hi = jnp.min(entropy_h), jnp.max(entropy_h)
    conc = 1.0 - (entropy_h - lo) / jnp.maximum(hi - lo, consts.entropy_span_floor)
    return consts.beta_min + consts.beta_span * conc


def write_gate_kernel(b_kernel_dh, beta_h, x_ntd, valid_nt, rule: str):
    """Wb [D, H] for target write strengths beta_h by `rule` (see module docstring)."""
    logit = jnp.log(beta_h) - jnp.log1p(-beta_h)
    d = b_kernel_dh.shape[0]
    if rule == "release":
        mean_abs = jnp.mean(jnp.abs(b_kernel_dh), axis=0)
        return b_kernel_dh / jnp.maximum(mean_abs, 1e-12) * (logit / math.sqrt(d))
    if rule == "mean_direction":
        w = valid_nt[..., None].astype(jnp.float32)
        mu = jnp.sum(x_ntd * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)
        return (mu / jnp.maximum(jnp.sum(mu * mu), 1e-12))[:, None] * logit[None, :]
    raise ValueError(f"unknown write gate rule {rule!r}; choose from {WRITE_GATE_RULES}")


def check_gdn(mixer: StudentMixer) -> None:
    """Phase 1 is closed-form for GDN: other student mixers are a ValueError."""
    if mixer.name != GDN:
        raise ValueError(f"Taylor phase 1 calibrates {GDN!r} mixers, not {mixer.name!r}")


def gdn_outputs(gdn_params, x_ntd, valid_nt, *, model_config, mixer: StudentMixer):
    """(O [N,T,H,V] pre-norm recurrence output, y [N,T,D] mixer output) of one GDN layer."""
    y, _, inter = mixer.module(model_config).apply(
        {"params": gdn_params}, x_ntd, valid_bt=valid_nt, return_intermediates=True
    )
    return inter["attn_context"], y


def calibrate_layer(
    gdn_params,
    x_ntd,
    context_nthd,
    valid_nt,
    distance_h,
    entropy_h,
    *,
    model_config,
    mixer: StudentMixer,
    consts: TaylorConstants,
):
    """Phase 1 for one layer: returns (new gdn params, diagnostics dict of [H] arrays)."""
    check_gdn(mixer)
    h, vd = mixer.config.num_heads, mixer.config.head_v_dim
    if context_nthd.shape[-2:] != (h, vd):
        raise ValueError(
            f"teacher context has heads x dim {context_nthd.shape[-2:]}, the GDN layer "
            f"{(h, vd)}; the student must have the teacher's query heads and head dim"
        )
    x = x_ntd.astype(jnp.float32)
    ctx = context_nthd.astype(jnp.float32)
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in gdn_params.items()}

    parts = consts.phase1_parts
    a_log, dt_bias, gamma = decay_params(distance_h.astype(jnp.float32), consts)
    if "decay" in parts:
        p["A_log"], p["dt_bias"] = a_log, dt_bias
        p["a_proj"]["kernel"] = p["a_proj"]["kernel"] * consts.a_proj_scale
    beta = beta_targets(entropy_h.astype(jnp.float32), consts)
    if "write_gate" in parts:
        p["b_proj"]["kernel"] = write_gate_kernel(
            p["b_proj"]["kernel"], beta, x, valid_nt, consts.write_gate
        )

    # Value scale by least squares against the teacher context.
    o, _ = gdn_outputs(p, x, valid_nt, model_config=model_config, mixer=mixer)
    w = valid_nt[..., None, None].astype(jnp.float32)
    num = jnp.sum(ctx * o * w, axis=(0, 1, 3))
    den = jnp.sum(o * o * w, axis=(0, 1, 3))
    sigma_raw = num / jnp.maximum(den, 1e-30)
    sigma = jnp.clip(sigma_raw, consts.sigma_min, consts.sigma_max)
    if "value_scale" in parts:
        wv_dhv = p["v_proj"]["kernel"].reshape(-1, h, vd)
        p["v_proj"]["kernel"] = (wv_dhv * sigma[None, :, None]).reshape(-1, h * vd)
    wv = p["v_proj"]["kernel"]

    # Output gate: Wg = alpha Wv, small but carrying value-space structure.
    wt = valid_nt[..., None].astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(wt), 1.0)
    rms_c = jnp.sqrt(jnp.sum(jnp.square(ctx).reshape(*ctx.shape[:2], -1) * wt) / (n_tok * h * vd))
    sv = jax.nn.silu(x @ wv)
    rms_v = jnp.sqrt(jnp.sum(jnp.square(sv) * wt) / (n_tok * sv.shape[-1]))
    alpha = consts.gate_damping * rms_c / jnp.maximum(rms_v, 1e-30)
    if "output_gate" in parts:
        p["g_proj"]["kernel"] = alpha * wv

    b_logit = x @ p["b_proj"]["kernel"]  # [N, T, H]
    diag = {
        "distance": distance_h,
        "entropy": entropy_h,
        "gamma": gamma,
        "half_life": math.log(2.0) / gamma,
        "beta_target": beta,
        "beta_mean": _masked_mean(jax.nn.sigmoid(b_logit), wt, (0, 1)),
        "sigma_raw": sigma_raw,
        "sigma": sigma,
        "alpha": jnp.broadcast_to(alpha, (h,)),
    }
    return p, diag


@functools.partial(jax.jit, static_argnames=("model_config", "mixer", "consts"))
def _calibrate_row(
    gdn_params,
    x_lntd,
    context_lnthd,
    valid_nt,
    distance_lh,
    entropy_lh,
    row,
    *,
    model_config,
    mixer,
    consts,
):
    """`calibrate_layer` on row `row` of the statistics; `row` is traced, so every layer of a
    model runs the same compiled program."""
    return calibrate_layer(
        gdn_params,
        x_lntd[row],
        context_lnthd[row],
        valid_nt,
        distance_lh[row],
        entropy_lh[row],
        model_config=model_config,
        mixer=mixer,
        consts=consts,
    )


def taylor_init(student_params, stats, layers: Sequence[int], *, model_config, mixer, consts):
    """Applies phase 1 to the GDN mixers of `layers` of a student (e.g. a `copy` conversion).

    Layer by layer, through one jitted `calibrate_layer` (configs static, the statistics row
    traced): phase 1 compiles once per configuration and shapes, whatever the number of layers.
    Returns (new student params, diagnostics {name: [L, H]}); only the mixer subtrees of
    `layers` are new, every other array is the input's.
    """
    layers = tuple(layers)
    if not layers:
        return student_params, {}
    if stats.x_lntd is None:
        raise ValueError("statistics were collected with keep_activations=False")
    check_gdn(mixer)
    check_mixers(student_params, layers, mixer.name)
    rows = [stats.index(i) for i in layers]
    out, diags = student_params, []
    for i, row in zip(layers, rows, strict=True):
        gdn, diag = _calibrate_row(
            layer_mixer(student_params, i, mixer.name),
            stats.x_lntd,
            stats.context_lnthd,
            stats.valid_nt,
            stats.distance_lh,
            stats.entropy_lh,
            row,
            model_config=model_config,
            mixer=mixer,
            consts=consts,
        )
        out = with_layer_mixer(out, i, mixer.name, gdn)
        diags.append(diag)
    return out, jax.tree.map(lambda *xs: jnp.stack(xs), *diags)
