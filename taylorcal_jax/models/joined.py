"""Params with the kernels of products that share an input joined, for decoding loops.

Letters: D input width, F_i output width of part i.

Some products of a block read the same input x [.., D]: the MLP's gate and up, a GDN layer's
q, k, v and g and its a and b, softmax attention's q, k and v (with their biases, where the
teacher has them: Qwen2). Run as one product of the kernels joined along their outputs,

    x [W_1 | W_2 | ...] + [b_1 | b_2 | ...] = [x W_1 + b_1 | x W_2 + b_2 | ...]
                                                    W_joined [D, F_1 + F_2 + ...]

they take one launch and one read of x instead of several, with the same sums per output. That
matters in a decoding step, where every product is a launch that reads its whole matrix for one
token (at batch 1 on a GPU the products are most of the step). The params keep each kernel
whole under its own name (the layout of training, of checkpoints and of the exported model), so
a module that joins them does it each time it runs; inside a decoding loop that is once per
token, and where the product is our few-row kernel (a custom call that XLA cannot fuse a
concatenation into) the join is a copy of the joined matrix every step: 11 us per GDN layer of
the Qwen2.5-1.5B-shaped student at batch 1 on an H100, its largest kernel after the products
(launch/results/profile_steps_h100_decode_defaults.md).

`join_for_decoding(params)` joins them once: in every dict of the tree that holds all parts of
a group (`DECODING_GROUPS`; the parts in table `GROUPS`) as Dense params, all bias-free
({"kernel": W}) or all with a bias ({"kernel": W, "bias": b}), the parts are replaced by one
kernel under the group's name (and one bias under `bias_name(group)`). Groups are tried in
that order and a part joins once: a GDN layer's q, k and v join with its g, a and b
(`GDN_QKVGAB`), softmax attention's, which has no g, as `ATTN_QKV`. The modules (layers.MLP,
layers.Attention, mixers.gdn.GatedDeltaNet) use a joined kernel when their params hold one,
and the parts otherwise; both give the same outputs (tests/test_joined.py). Idempotent. The
parts are dropped from the result, so the joined tree takes the same memory as the original
once that is released.

Norms. A block's RMSNorm before such a product is folded into its joined kernel as well:

    rmsnorm(x) W = (r x * scale) W = r (x (diag(scale) W)),   r = 1 / sqrt(mean(x^2) + eps)

per row, so the joined kernel becomes diag(scale) W and the norm's params are dropped; the
block then hands the product x and the row scale r (`FOLDED_NORMS`, `norm_folded`), which the
product applies to its float32 sums. That saves the norm's multiply, a launch per norm and
step: on a GPU at batch 1 the product is our few-row kernel, a custom call into which XLA
cannot fuse the multiply, while r, a reduction, fuses with the residual add before it and its
use with the reduction of the kernel's partial sums after it. A bias (Qwen2's q, k, v) is
added after the scaling, as before. The input norm folds only where one joined kernel reads it
(a block holding both mixers keeps it).

Measured on one H100 (launch/results/probe_decode_h100_joined.json, 32k context, before the
attention's q|k|v joined): the student's batch-1 decoding step took 2.13 ms with joined params
against 2.49 ms (0.86x), the teacher's (only its MLPs joined) 2.56 against 2.62 ms; at batch
16 0.98x-0.99x. Joining the attention's q|k|v as well took the teacher's batch-1 step at 32k
from 2.187 to 2.026 ms (0.93x) on one H200, batch 16 within 1%
(launch/results/probe_decode_h200_ab_{027810c,048c6f3}.json). Joining a GDN layer's a and b
with its q, k, v and g (before: two groups, two products) took the student's 32k steps on one
H100 to 0.985x at batch 1 and 0.992x at batch 16, means of two alternating runs
(launch/results/probe_decode_h100_qkvgab_*.json). Folding the norms took the 32k steps at batch
1 to 0.980x (student) and 0.976x (teacher) on one H100, batch 16 to 0.988x and 1.000x
(launch/results/probe_decode_h100_norms_*.json).
"""

from __future__ import annotations

import jax.numpy as jnp

# joined name -> the parts, in the order of their outputs in the joined kernel
MLP_GATE_UP = "gate_up_kernel"
GDN_QKVG = "qkvg_kernel"
GDN_AB = "ab_kernel"
GDN_QKVGAB = "qkvgab_kernel"
ATTN_QKV = "qkv_kernel"
_GDN_QKVG_PARTS = ("q_proj", "k_proj", "v_proj", "g_proj")
_GDN_AB_PARTS = ("a_proj", "b_proj")
GROUPS = {
    MLP_GATE_UP: ("gate_proj", "up_proj"),
    GDN_QKVG: _GDN_QKVG_PARTS,
    GDN_AB: _GDN_AB_PARTS,
    GDN_QKVGAB: _GDN_QKVG_PARTS + _GDN_AB_PARTS,
    ATTN_QKV: ("q_proj", "k_proj", "v_proj"),
}
# the groups `join_for_decoding` forms, in the order it tries them (module docstring). A GDN
# layer's six input products become one: its gate logits x [Wa | Wb] (2 H columns, float32 out)
# ride along with q, k, v and g, which saves the gate logits' own product, a launch per GDN
# layer and step (GDN_QKVG and GDN_AB are the two products of training's joined projections).
DECODING_GROUPS = (MLP_GATE_UP, GDN_QKVGAB, ATTN_QKV)
# groups whose joined kernel gets zero columns up to a multiple of PAD_COLUMNS (the modules slice
# their outputs by width): the 2 H gate-logit columns would leave the GDN product's width off the
# multiples of 16 that the few-row kernel takes (ops/gemv) and of the 128-column blocks it reads
# best (2 H K + 2 H V + 2 H = 6168 at Qwen2.5-1.5B's shape -> 6272, 1.7% more bytes). Measured:
# without them (a partial, masked last block in the kernel) the student's batch-1 step took
# 1.011x the time on one H100 (docs/benchmarks.md §4)
PADDED_GROUPS = (GDN_QKVGAB,)
PAD_COLUMNS = 128
# a block's norm -> the joined groups that may read its output (module docstring, "Norms")
FOLDED_NORMS = {
    "input_layernorm": (GDN_QKVGAB, ATTN_QKV),
    "post_attention_layernorm": (MLP_GATE_UP,),
}


def norm_folded(module, norm: str) -> bool:
    """Whether the params that `module` (a block) runs with have its norm `norm` folded into
    the product after it (`join_for_decoding`): the norm's params are absent outside init."""
    return not module.is_initializing() and not module.has_variable("params", norm)


def bias_name(group: str) -> str:
    """Where the joined bias of `group` is held ("qkv_kernel" -> "qkv_bias")."""
    return group.removesuffix("_kernel") + "_bias"


def _as_dict(tree):
    if hasattr(tree, "items"):
        return {name: _as_dict(sub) for name, sub in tree.items()}
    return tree


def _dense_layout(node):
    """The keys of a Dense layer's params ({"kernel"} or {"kernel", "bias"}), else None."""
    if isinstance(node, dict) and set(node) in ({"kernel"}, {"kernel", "bias"}):
        return frozenset(node)
    return None


def _join(tree):
    if not isinstance(tree, dict):
        return tree
    out = {name: _join(sub) for name, sub in tree.items()}
    for group in DECODING_GROUPS:
        parts = GROUPS[group]
        layouts = {_dense_layout(out.get(p)) for p in parts}
        if len(layouts) != 1 or None in layouts:
            continue  # a part missing, not a Dense layer's, or biases on some parts only
        dense = [out.pop(p) for p in parts]
        kernels = [d["kernel"] for d in dense]
        if group in PADDED_GROUPS:
            width = sum(k.shape[1] for k in kernels)
            kernels.append(jnp.zeros((kernels[0].shape[0], -width % PAD_COLUMNS), kernels[0].dtype))
        out[group] = jnp.concatenate(kernels, axis=1)
        if "bias" in layouts.pop():
            out[bias_name(group)] = jnp.concatenate([d["bias"] for d in dense])
    return _fold_norms(out)


def _fold_norms(block):
    """A block's params with each norm of `FOLDED_NORMS` folded into the one joined kernel that
    reads its output (module docstring): W <- diag(scale) W, the norm's params dropped."""
    for norm, groups in FOLDED_NORMS.items():
        if set(block.get(norm) or ()) != {"scale"}:
            continue
        readers = [(sub, group) for sub in block.values() if isinstance(sub, dict)
                   for group in groups if group in sub]  # fmt: skip
        if len(readers) != 1:
            continue  # no joined reader, or several (a block holding both mixers)
        sub, group = readers[0]
        kernel = sub[group]
        scale = block.pop(norm)["scale"].astype(jnp.float32)
        sub[group] = (scale[:, None] * kernel.astype(jnp.float32)).astype(kernel.dtype)
    return block


def join_for_decoding(params):
    """`params` (a model's param tree; a Flax FrozenDict is read as a dict) with each group's
    kernels joined and the norms before them folded in (module docstring)."""
    return _join(_as_dict(params))
