"""Decoding attention (ops/decode_attention): the Pallas flash-decoding kernel in interpret mode and
the XLA form, against a float64 NumPy reference; and a model's decoding steps by either.

Metric: rel = max|a - b| / max|b|. Tolerances:
  float32 inputs vs the fp64 reference                                   2e-5 (fp32 sums)
  bfloat16 inputs vs the fp64 reference of the same bf16 values          1.5e-2 (probabilities
      and the output rounded to bf16: 2^-8 relative each)
  model decode logits, pallas vs xla, float32                            2e-5
  kernel vs the XLA form (reference.attend_one_query), same dtype        as vs fp64
The cases: GQA groups G = 1, 2, 6 (and 3, 6, 20 for the query rows each program reads); S = 37
slots in blocks of 16 (a partial block, and splits of two blocks so that the last split's second
block lies wholly past S); rows with different valid slots (all, left padding and unfilled
slots, a sliding window, one slot, none).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import greedy_steps
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.ops.decode_attention import api, pallas_gpu, reference

S, D = 37, 16
# block_s 16 -> 3 blocks of S; programs per (b, KV head) 2 -> 2 splits of 2 blocks (the last
# split's second block lies wholly past S), or many -> 3 splits of 1 block
SPLITS_PER_ROW = {"split2": 2, "split1": 1000}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _mask():
    """[5, S] bool: all slots; left padding 3 and slots past 20 unfilled; a window of 6 ending at
    slot 30; slot 0 only; no slot at all."""
    s = np.arange(S)
    rows = [s >= 0, (s >= 3) & (s <= 20), (s > 24) & (s <= 30), s == 0, s < 0]
    return jnp.asarray(np.stack(rows))


def _inputs(h, hkv, dtype, seed=0):
    b = 5
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = (2.0 * jax.random.normal(kq, (b, 1, h, D))).astype(dtype)
    k = (2.0 * jax.random.normal(kk, (b, S, hkv, D))).astype(dtype)
    v = jax.random.normal(kv, (b, S, hkv, D)).astype(dtype)
    return q, k, v, _mask()


def _reference64(q, k, v, mask):
    """float64 NumPy: query head h against KV head h // G (HF repeat_kv); a row with no valid
    slot averages V over all slots (every logit equal), as the finite mask value gives."""
    qn, kn, vn = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kn, vn = np.repeat(kn, g, axis=2), np.repeat(vn, g, axis=2)
    logits = np.einsum("bhd,bshd->bhs", qn[:, 0], kn) / np.sqrt(q.shape[-1])
    m = np.asarray(mask)[:, None, :]
    none = ~m.any(-1, keepdims=True)
    logits = np.where(m, logits, -np.inf)
    logits = np.where(none, 0.0, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhs,bshd->bhd", p, vn)[:, None]


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 1)])  # G = 1, 2, 6
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("split", sorted(SPLITS_PER_ROW))
def test_pallas_kernel_equals_the_fp64_reference(h, hkv, dtype, tol, split):
    q, k, v, mask = _inputs(h, hkv, dtype)
    config = pallas_gpu.DecodeConfig(block_s=16, programs=SPLITS_PER_ROW[split] * 5 * hkv)
    ns, per_split = pallas_gpu.split_plan(config, q.shape[0], hkv, S)
    assert (ns, per_split) == ((2, 2) if split == "split2" else (3, 1))
    got = pallas_gpu.decode_attention_pallas(q, k, v, mask, dtype, interpret=True, config=config)
    assert got.shape == q.shape and got.dtype == dtype
    assert _rel(got, _reference64(q, k, v, mask)) <= tol


@pytest.mark.parametrize("h,hkv", [(6, 2), (12, 2), (40, 2)])  # G = 3, 6, 20
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1.5e-2)])
def test_query_rows_are_read_where_they_lie(h, hkv, dtype, tol):
    # each program loads Gp rows of q [B, H, d] from row j G on (Gp = 16, 16, 32): the tile of
    # KV head 0 overlaps KV head 1's query rows, and that of KV head 1 runs past H; the rows past
    # G of the tile must leave no trace, and q is not copied into a padded array first
    q, k, v, mask = _inputs(h, hkv, dtype, seed=5)
    config = pallas_gpu.DecodeConfig(block_s=16, programs=2 * 5 * hkv)

    def run(*a):
        return pallas_gpu.decode_attention_pallas(*a, dtype, interpret=True, config=config)

    assert not equations(jax.make_jaxpr(run)(q, k, v, mask).jaxpr, "pad")
    assert _rel(run(q, k, v, mask), reference.attend_one_query(q, k, v, mask, dtype)) <= tol


def test_combine_over_more_splits_than_one_load(monkeypatch):
    # 71 splits of one 16-slot block (S = 1125, the last block partial), head dim 64 in 4 parts
    # of 16 (12 query heads: fewer programs than COMBINE_PROGRAMS); loads of 512 elements make
    # the combine read the splits in 4 loads of 32, the last one 7 splits long, the rest masked
    monkeypatch.setattr(pallas_gpu, "COMBINE_LOAD", 512)
    b, s, h, hkv, d = 2, 16 * 70 + 5, 6, 2, 64
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(4), 3)
    q = 2.0 * jax.random.normal(kq, (b, 1, h, d))
    k = 2.0 * jax.random.normal(kk, (b, s, hkv, d))
    v = jax.random.normal(kv, (b, s, hkv, d))
    mask = jnp.arange(s)[None, :] < jnp.asarray([[s], [700]])
    config = pallas_gpu.DecodeConfig(block_s=16, programs=100 * b * hkv)
    assert pallas_gpu.split_plan(config, b, hkv, s) == (71, 1)
    assert pallas_gpu.combine_plan(b, h, 71, d) == (4, 32)
    got = pallas_gpu.decode_attention_pallas(q, k, v, mask, q.dtype, interpret=True, config=config)
    assert _rel(got, _reference64(q, k, v, mask)) <= 2e-5


def test_combine_plan():
    # a batch-1 step of Qwen2.5-1.5B's attention (12 query heads, 256 splits at 32k): head dim
    # 128 in 8 parts of 16, all splits in one load; at batch 16 one part, 16 splits
    assert pallas_gpu.combine_plan(1, 12, 256, 128) == (8, 256)
    assert pallas_gpu.combine_plan(16, 12, 16, 128) == (1, 16)
    assert pallas_gpu.combine_plan(1, 12, 65, 128) == (8, 128)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1.5e-2)])
def test_api_impls_equal_the_fp64_reference(impl, dtype, tol):
    q, k, v, mask = _inputs(6, 2, dtype, seed=1)
    got = jax.jit(lambda *a: api.decode_attention(*a, dtype, impl=impl))(q, k, v, mask)
    assert got.dtype == dtype
    assert _rel(got, _reference64(q, k, v, mask)) <= tol


def test_gradients_are_the_xla_forms():
    q, k, v, mask = _inputs(6, 2, jnp.float32, seed=2)
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape)

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * api.decode_attention(q, k, v, mask, q.dtype, impl=impl))

    got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= 1e-6


def test_split_plan_covers_every_slot_once():
    config = pallas_gpu.DecodeConfig(block_s=64, programs=512)
    for b, hkv, s in [(1, 2, 4160), (16, 2, 65600), (16, 2, 64), (1, 1, 1), (3, 4, 1000)]:
        ns, per_split = pallas_gpu.split_plan(config, b, hkv, s)
        span = per_split * config.block_s
        assert ns * span >= s > (ns - 1) * span, (b, hkv, s)  # covered; no split empty
        assert b * hkv * ns <= max(config.programs, b * hkv), (b, hkv, s)
    # the long batched row: B * Hkv = 32 programs per split, 16 splits of 1025 blocks
    assert pallas_gpu.split_plan(config, 16, 2, 65600) == (16, 65)


def test_auto_is_xla_off_gpu_and_bad_choices_are_errors():
    assert jax.default_backend() == "cpu"
    assert api.resolve_impl("auto") == "xla"
    assert api.resolve_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="unknown decode attention impl 'triton'"):
        api.resolve_impl("triton")
    with pytest.raises(ValueError, match="decode_impl must be one of"):
        AttentionRuntime(decode_impl="triton")
    with pytest.raises(ValueError, match="block_s must be a power of two"):
        pallas_gpu.DecodeConfig(block_s=48)
    q, k, v, mask = _inputs(4, 2, jnp.float32)
    with pytest.raises(ValueError, match="head dim 12 must be a power of two"):
        pallas_gpu.decode_attention_pallas(q[..., :12], k[..., :12], v[..., :12], mask, q.dtype)


@pytest.mark.parametrize(
    "args,message",
    [
        (lambda q, k, v, m: (q[:, :0], k, v, m), r"q must be \[B, 1, H, d\]"),
        (lambda q, k, v, m: (q, k, v[:, :3], m), "k and v must both be"),
        (lambda q, k, v, m: (q, k[:2], v[:2], m), "must match q's B=5"),
        (lambda q, k, v, m: (q[:, :, :3], k, v, m), "H=3 must be a multiple of the KV heads"),
        (lambda q, k, v, m: (q, k, v, m.astype(jnp.int8)), r"mask must be bool \[B, S\]"),
    ],
)
def test_bad_inputs_are_one_line_errors(args, message):
    q, k, v, mask = _inputs(4, 2, jnp.float32)
    with pytest.raises(ValueError, match=message) as e:
        api.decode_attention(*args(q, k, v, mask), jnp.float32, impl="xla")
    assert "\n" not in str(e.value)


def test_model_decode_steps_pallas_equal_xla():
    # a hybrid student: attention in layers 0 and 2 (a sliding window of 4 in layer 2), GDN in
    # layer 1; a left-padded prompt into a cache of 16 slots, then three decoding steps
    config = tiny_model_config(
        model_type="qwen2",
        num_hidden_layers=3,
        head_dim=16,
        sliding_windows=(None, None, 4),
        max_position_embeddings=64,
    )
    sc = StudentConfig.from_teacher(config, (0, 2), mixer="gdn", use_short_conv=True)
    models = {
        impl: sc.model(
            runtime=GDNRuntime(impl="chunked"), attention_runtime=AttentionRuntime(decode_impl=impl)
        )
        for impl in ("xla", "pallas")
    }
    steps = greedy_steps(models, config.vocab_size)
    for impl, (_, calls) in steps.items():
        assert (calls > 0) == (impl == "pallas")  # the kernel runs, or none
    assert _rel(steps["pallas"][0], steps["xla"][0]) <= 2e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("h", [12, 40])  # G = 6 (Qwen2.5-1.5B's), 20 (q tiles of 32 rows)
def test_kernel_lowers_to_triton_for_a_gpu(dtype, h):
    # Pallas's Triton lowering runs here, without a GPU (the export for platform "cuda"): shapes
    # and dtypes of every load, dot and store pass its checks. Compiling the Triton IR needs a GPU.
    b, s, hkv, d = 2, 4160, 2, 128  # the Qwen2.5-1.5B attention shape, S a ragged 65 x 64
    args = [jax.ShapeDtypeStruct(x, dtype) for x in ((b, 1, h, d), (b, s, hkv, d), (b, s, hkv, d))]
    args.append(jax.ShapeDtypeStruct((b, s), jnp.bool_))
    fn = jax.jit(lambda *a: pallas_gpu.decode_attention_pallas(*a, dtype, interpret=False))
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(*args)
    assert exported.mlir_module().count(triton) == 2  # the kernel and the combine kernel


@pytest.mark.gpu
@pytest.mark.parametrize("b,s", [(1, 4160), (4, 16448)])
def test_compiled_kernel_equals_xla_on_gpu(b, s):
    # the Qwen2.5-1.5B attention shape (12 heads, 2 KV heads, d 128) in bf16, compiled by Triton
    h, hkv, d = 12, 2, 128
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, 1, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, hkv, d), jnp.bfloat16)
    mask = jnp.arange(s)[None, :] < (s - 64 - 7 * jnp.arange(b))[:, None]
    got = jax.jit(lambda *a: api.decode_attention(*a, jnp.bfloat16, impl="pallas"))(q, k, v, mask)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    want = reference.attend_one_query(q32, k32, v32, mask, jnp.float32)
    assert _rel(got, want) <= 1.5e-2
