"""tests/flash_attn_reference.py against an explicit float64 loop over queries and heads, in
the cases fla's attention layer produces: a causal prefill (Tq = Tk), one new query against a
cache (Tq = 1, bottom-right aligned), a sliding window (left = W - 1, right = 0), grouped
heads, and packed sequences of different lengths."""

import math

import numpy as np
import pytest
import torch
from flash_attn_reference import flash_attn_func, flash_attn_varlen_func


def loop_attention(q, k, v, causal, window_size):
    """out[b, i, h] = sum_j p_ij v[b, j, h // G] over the keys query i may read, float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, tq, h, d = q.shape
    tk, groups = k.shape[1], h // k.shape[2]
    left, right = window_size
    out = np.zeros_like(q)
    for bb in range(b):
        for i in range(tq):
            slot = i + tk - tq
            keys = [
                j
                for j in range(tk)
                if (not causal or j <= slot)
                and (left < 0 or j >= slot - left)
                and (right < 0 or j <= slot + right)
            ]
            for hh in range(h):
                s = np.array([q[bb, i, hh] @ k[bb, j, hh // groups] for j in keys]) / math.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                rows = [v[bb, j, hh // groups] for j in keys]
                out[bb, i, hh] = sum(pj * row for pj, row in zip(p, rows, strict=True))
    return out


def _qkv(rng, b, tq, tk, h=4, kv=2, d=8):
    draw = lambda *shape: torch.as_tensor(rng.standard_normal(shape), dtype=torch.float32)  # noqa: E731
    return draw(b, tq, h, d), draw(b, tk, kv, d), draw(b, tk, kv, d)


@pytest.mark.parametrize(
    "tq, tk, causal, window",
    [
        (7, 7, True, (-1, -1)),  # causal prefill
        (1, 9, True, (-1, -1)),  # one new query reads the whole cache
        (3, 9, True, (-1, -1)),  # three new queries after six cached keys
        (8, 8, True, (2, 0)),  # a window of 3 keys, the query's own included
        (1, 9, True, (3, 0)),  # one new query, the last 4 keys
        (5, 5, False, (-1, -1)),  # no mask
    ],
)
def test_dense_form_equals_the_loop(tq, tk, causal, window):
    q, k, v = _qkv(np.random.default_rng(tq * 100 + tk), 2, tq, tk)
    got = flash_attn_func(q, k, v, causal=causal, window_size=window)
    want = loop_attention(q, k, v, causal, window)
    assert got.dtype == q.dtype and got.shape == q.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_varlen_form_equals_each_sequence_alone():
    rng = np.random.default_rng(1)
    lengths_q, lengths_k = [5, 1, 3], [5, 6, 3]
    parts = [_qkv(rng, 1, tq, tk) for tq, tk in zip(lengths_q, lengths_k, strict=True)]
    q, k, v = (torch.cat([p[n][0] for p in parts]) for n in range(3))
    cu_q = torch.tensor(np.cumsum([0, *lengths_q]), dtype=torch.int32)
    cu_k = torch.tensor(np.cumsum([0, *lengths_k]), dtype=torch.int32)
    got = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True)
    for (pq, pk, pv), start, stop in zip(parts, cu_q[:-1], cu_q[1:], strict=True):
        want = loop_attention(pq, pk, pv, True, (-1, -1))[0]
        np.testing.assert_allclose(got[start:stop].numpy(), want, rtol=1e-5, atol=1e-6)


def test_bf16_in_bf16_out():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(np.random.default_rng(2), 1, 4, 4))
    got = flash_attn_func(q, k, v, causal=True)
    want = loop_attention(q.float(), k.float(), v.float(), True, (-1, -1))
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), want, rtol=2e-2, atol=2e-2)
