"""flash-attn's two entry points that flash-linear-attention's softmax attention layer calls
(`fla.layers.attn`), written out in PyTorch, for running fla's own hybrid models where the
flash-attn package is not installed (it ships as source only and needs a CUDA build).

The rules are flash-attn's, as its documentation states them:

- q [B, Tq, H, D], k and v [B, Tk, Hkv, D] with H a multiple of Hkv: query head h reads key
  and value head h // (H / Hkv).
- scores s_ij = softmax_scale q_i . k_j, softmax_scale = 1 / sqrt(D) by default.
- causal masking is aligned to the bottom right: query i (0 <= i < Tq) may read key j when
  j <= i + Tk - Tq, so one new query against a cache of Tk keys reads all of them.
- window_size = (left, right), -1 meaning unbounded: query i reads key j only when
  i + Tk - Tq - left <= j <= i + Tk - Tq + right.
- the varlen form takes the sequences packed along the first axis, sequence n holding rows
  cu_seqlens[n] .. cu_seqlens[n + 1] - 1, and treats each as its own batch of one.

The sums are in float32 and the output is in q's dtype. Checked against an explicit loop in
tests/test_flash_attn_reference.py; installed for fla by tests/export_numerics.py.
"""

from __future__ import annotations

import math

import torch


def allowed_keys(tq: int, tk: int, causal: bool, window_size=(-1, -1), device=None):
    """[Tq, Tk] bool: which keys each query may read (module docstring)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)  # the query's bottom-right slot
    j = torch.arange(tk, device=device)[None, :]
    left, right = window_size
    ok = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **unused
):
    """Attention of q [B, Tq, H, D] over k, v [B, Tk, Hkv, D] -> [B, Tq, H, D]."""
    if dropout_p:
        raise ValueError("the reference has no dropout")
    heads, kv_heads = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    k = k.float().repeat_interleave(heads // kv_heads, dim=2)
    v = v.float().repeat_interleave(heads // kv_heads, dim=2)
    s_bhqk = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    ok = allowed_keys(q.shape[1], k.shape[1], causal, window_size, q.device)
    s_bhqk = s_bhqk.masked_fill(~ok, float("-inf"))
    p_bhqk = torch.softmax(s_bhqk, dim=-1).nan_to_num(0.0)  # a query with no key reads nothing
    return torch.einsum("bhqk,bkhd->bqhd", p_bhqk, v).to(q.dtype)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, **options
):
    """Packed sequences: q [sum Tq, H, D], k and v [sum Tk, Hkv, D] -> [sum Tq, H, D]."""
    out = torch.empty_like(q)
    for n in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
        k0, k1 = int(cu_seqlens_k[n]), int(cu_seqlens_k[n + 1])
        one = flash_attn_func(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **options)
        out[q0:q1] = one[0]
    return out
