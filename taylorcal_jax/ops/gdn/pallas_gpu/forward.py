"""The forward of the Pallas gated delta rule: the kernels of each path, in order.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks.

float32 path: kernel 1 (w, u, G, kd; chunk.py), the state pass (h, v', final state; states.py),
the output kernel (o; output.py).

bfloat16 path, by what the call keeps for a backward and whether the state pass is segmented
(segments.num_state_segments):
  keeps nothing (outside differentiation, or residuals "inputs"), unsegmented: kernel 1 (w, u,
    G) and the fused pass (o and the final state; no h or v' in memory);
  otherwise: kernel 1 (w, u, G; and T when kept), the state pass, the output kernel. Unsegmented,
    the state pass forms kd from k itself; segmented, kernel 1 writes kd, which the segment-end
    kernel reads too.
"""

from __future__ import annotations

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.operands import operand_dtype
from taylorcal_jax.ops.gdn.pallas_gpu.chunk import chunk_call
from taylorcal_jax.ops.gdn.pallas_gpu.output import fused_call, out_call
from taylorcal_jax.ops.gdn.pallas_gpu.segments import num_state_segments, state_pass
from taylorcal_jax.ops.gdn.pallas_gpu.states import states_call


def forward(q, k, v, g, beta, s0, st: Static, keep=False):
    """((o [B, Tp, H, V] in v's dtype, final state fp32), kept). With `keep` (the bfloat16 path,
    residuals "t" or "states") kept = (G, T, (h, v') or None) for the backward, else None."""
    dt = operand_dtype(q, k, v)
    if st.cfg.path == "float32":
        w, u, gcum, kd = chunk_call(k, v, g, beta, st, dt, with_kd=True)
        hmat, vp, s_final = states_call(w, u, kd, gcum, s0, st, dt)
        return (out_call(q, k, gcum, hmat, vp, st, dt, v.dtype), s_final), None
    unsegmented = num_state_segments(st, *k.shape, v.shape[-1]) == 1
    if not keep and unsegmented:
        w, u, gcum = chunk_call(k, v, g, beta, st, dt)
        return fused_call(q, k, w, u, gcum, s0, st, dt, v.dtype), None
    w, u, gcum, *extra = chunk_call(k, v, g, beta, st, dt, with_kd=not unsegmented, with_t=keep)
    tmat = extra.pop() if keep else None
    kd = k if unsegmented else extra[0]
    hmat, vp, s_final = state_pass(w, u, kd, gcum, s0, st, dt, kd_from_k=unsegmented)
    out = out_call(q, k, gcum, hmat, vp, st, dt, v.dtype), s_final
    if not keep:
        return out, None
    return out, (gcum, tmat, (hmat, vp) if st.residuals == "states" else None)
