"""Params with the kernels of products that share an input joined, for decoding loops.

Letters: D input width, F_i output width of part i.

Some products of a block read the same input x [.., D]: the MLP's gate and up, a GDN layer's
q, k, v and g and its a and b. Run as one product of the kernels joined along their outputs,

    x [W_1 | W_2 | ...] = [x W_1 | x W_2 | ...]        W_joined [D, F_1 + F_2 + ...]

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
a group (table `GROUPS`) as bias-free kernels ({"kernel": W}), the parts are replaced by one
array under the group's name. The modules (layers.MLP, mixers.gdn.GatedDeltaNet) use a joined
kernel when their params hold one, and join the parts themselves otherwise; both give the
same outputs (tests/test_joined.py). Idempotent. The parts are dropped from the result, so the
joined tree takes the same memory as the original once that is released.

Measured on one H100 (launch/results/probe_decode_h100_joined.json, 32k context): the student's
batch-1 decoding step took 2.13 ms with joined params against 2.49 ms (0.86x), the teacher's
(only its MLPs join) 2.56 against 2.62 ms; at batch 16 0.98x-0.99x.
"""

from __future__ import annotations

import jax.numpy as jnp

# joined name -> the parts, in the order of their outputs in the joined kernel
MLP_GATE_UP = "gate_up_kernel"
GDN_QKVG = "qkvg_kernel"
GDN_AB = "ab_kernel"
GROUPS = {
    MLP_GATE_UP: ("gate_proj", "up_proj"),
    GDN_QKVG: ("q_proj", "k_proj", "v_proj", "g_proj"),
    GDN_AB: ("a_proj", "b_proj"),
}


def _as_dict(tree):
    if hasattr(tree, "items"):
        return {name: _as_dict(sub) for name, sub in tree.items()}
    return tree


def _bias_free_kernel(node) -> bool:
    return isinstance(node, dict) and set(node) == {"kernel"}


def _join(tree):
    if not isinstance(tree, dict):
        return tree
    out = {name: _join(sub) for name, sub in tree.items()}
    for joined, parts in GROUPS.items():
        if all(_bias_free_kernel(out.get(p)) for p in parts):
            out[joined] = jnp.concatenate([out.pop(p)["kernel"] for p in parts], axis=1)
    return out


def join_for_decoding(params):
    """`params` (a model's param tree; a Flax FrozenDict is read as a dict) with each group's
    kernels joined (module docstring)."""
    return _join(_as_dict(params))
