"""qwen_fast.reference.attention against torch SDPA, explicit masks, and transformers' attention functions."""

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close, assert_within_budget
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function
from transformers.models.qwen3_moe.modeling_qwen3_moe import eager_attention_forward

import qwen_fast
from qwen_fast.reference.attention import flash_attn_func, flash_attn_varlen_func

LOW_PRECISION = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, *LOW_PRECISION]


def _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype=torch.float32, head_dim_v=None):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim_v or head_dim).to(dtype)
    return q, k, v


def _sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    """torch SDPA in flash-attn's [B, S, H, D] layout, GQA through enable_gqa."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2)


def _flash_mask(seqlen_q, seqlen_k, causal, window_size):
    """bool [Sq, Sk] from flash-attn's documented rule, written with tril/triu (independent of the reference)."""
    left, right = window_size
    if causal:
        right = 0
    shift = seqlen_k - seqlen_q  # query i sits on key diagonal i + shift
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        mask = mask.tril(diagonal=shift + right)
    if left >= 0:
        mask = mask.triu(diagonal=shift - left)
    return mask


def _check(out, ref_fn, inputs):
    """fp32: tight; fp16/bf16: the flash-attn budget against ref_fn on fp32 copies and in the inputs' dtype."""
    if out.dtype == torch.float32:
        assert_close(out, ref_fn(*inputs))
    else:
        assert_within_budget(out, ref_fn(*[x.float() for x in inputs]), ref_fn(*inputs))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (7, 97), (97, 7), (97, 97)])
def test_noncausal_matches_sdpa(seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype):
    q, k, v = _qkv(2, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype)
    _check(flash_attn_func(q, k, v), _sdpa, (q, k, v))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("seqlen", [1, 7, 97])
def test_causal_square_matches_sdpa_is_causal(seqlen, heads_q, heads_kv, dtype):
    q, k, v = _qkv(2, seqlen, seqlen, heads_q, heads_kv, 64, dtype)
    _check(flash_attn_func(q, k, v, causal=True), lambda *x: _sdpa(*x, is_causal=True), (q, k, v))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", [(-1, -1), (0, 0), (3, -1), (-1, 2), (5, 1), (200, 200)])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 97), (7, 97), (97, 7), (97, 96)])
def test_mask_matches_explicit_boolean_mask(seqlen_q, seqlen_k, window_size, causal, dtype):
    """Bottom-right causal alignment and windows against SDPA with the documented mask (fully masked rows give 0)."""
    q, k, v = _qkv(2, seqlen_q, seqlen_k, 8, 2, 64, dtype)
    mask = _flash_mask(seqlen_q, seqlen_k, causal, window_size)
    out = flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    assert not out.isnan().any()
    assert (out[:, ~mask.any(dim=1)] == 0).all()
    _check(out, lambda *x: _sdpa(*x, mask=mask), (q, k, v))


def test_causal_with_more_queries_than_keys_zeroes_the_first_rows():
    q, k, v = _qkv(1, 9, 4, 4, 1, 64)
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert_close(out[:, 5:], _sdpa(q[:, 5:], k, v, is_causal=True))  # the last 4 queries: square causal


@pytest.mark.parametrize("scale", [None, 0.3])
def test_softmax_scale_and_value_head_dim(scale):
    q, k, v = _qkv(2, 7, 13, 8, 2, 64, head_dim_v=32)
    out = flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    assert out.shape == (2, 7, 8, 32)
    assert_close(out, _sdpa(q, k, v, mask=_flash_mask(7, 13, True, (-1, -1)), scale=scale))


class _HFAttentionStub(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention module."""

    def __init__(self, num_key_value_groups):
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.is_causal = True
        self.layer_idx = 0


def _hf_attention(fn, q, k, v, mask, scaling):
    """transformers' attention function on [B, H, S, D] inputs; returns [B, S, Hq, D]."""
    module = _HFAttentionStub(q.shape[2] // k.shape[2]).eval()
    out, _ = fn(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scaling=scaling, dropout=0.0)
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 97), (7, 97), (97, 97)])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_causal_matches_transformers(implementation, seqlen_q, seqlen_k, heads_q, heads_kv, dtype):
    """The queries are the last Sq positions (decode / chunked prefill): transformers' q_offset = Sk - Sq."""
    q, k, v = _qkv(2, seqlen_q, seqlen_k, heads_q, heads_kv, 64, dtype)
    scaling = 64**-0.5
    mask = sdpa_mask(2, seqlen_q, seqlen_k, q_offset=seqlen_k - seqlen_q, allow_is_causal_skip=False)

    def reference(q, k, v):
        if implementation == "sdpa":
            return _hf_attention(sdpa_attention_forward, q, k, v, mask, scaling)
        additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
        return _hf_attention(eager_attention_forward, q, k, v, additive, scaling)

    _check(flash_attn_func(q, k, v, softmax_scale=scaling, causal=True), reference, (q, k, v))


@pytest.mark.parametrize("sliding_window", [1, 4, 50])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 97), (97, 97)])
def test_transformers_sliding_window_is_window_minus_one(seqlen_q, seqlen_k, sliding_window):
    """transformers' sliding_window=W (causal) keeps keys with i - j < W: flash-attn window_size=(W - 1, 0)."""
    q, k, v = _qkv(2, seqlen_q, seqlen_k, 8, 2, 64)
    mask = sdpa_mask(
        2, seqlen_q, seqlen_k, q_offset=seqlen_k - seqlen_q, allow_is_causal_skip=False,
        mask_function=sliding_window_causal_mask_function(sliding_window),
    )  # fmt: skip
    hf = _hf_attention(sdpa_attention_forward, q, k, v, mask, None)
    assert_close(flash_attn_func(q, k, v, causal=True, window_size=(sliding_window - 1, -1)), hf)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal, window_size", [(False, (-1, -1)), (True, (-1, -1)), (True, (4, 0)), (False, (2, 3))])
@pytest.mark.parametrize(
    "lens_q, lens_k",
    [([5], [5]), ([3, 0, 7, 1], [3, 0, 7, 97]), ([1, 1, 1], [13, 1, 0]), ([0, 0], [0, 0]), ([97, 2], [7, 2])],
)
def test_varlen_matches_per_sequence(lens_q, lens_k, causal, window_size, dtype):
    heads_q, heads_kv, head_dim = 8, 2, 64
    q = torch.randn(sum(lens_q), heads_q, head_dim).to(dtype)
    k = torch.randn(sum(lens_k), heads_kv, head_dim).to(dtype)
    v = torch.randn(sum(lens_k), heads_kv, head_dim).to(dtype)
    cu_q = torch.tensor([0, *lens_q], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0, *lens_k], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window_size
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    for b in range(len(lens_q)):
        q_b, k_b, v_b = q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        expected = flash_attn_func(q_b[None], k_b[None], v_b[None], causal=causal, window_size=window_size)[0]
        if lens_k[b] == 0:
            assert (expected == 0).all()
        assert_close(out[cu_q[b] : cu_q[b + 1]], expected)


# --- bad input: named, value-bearing errors from qwen_fast.flash_attn_func and flash_attn_varlen_func ----------------


def _dense(B=2, Sq=5, Sk=7, Hq=8, Hkv=2, D=64):
    return {"q": torch.randn(B, Sq, Hq, D), "k": torch.randn(B, Sk, Hkv, D), "v": torch.randn(B, Sk, Hkv, D)}


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: {"q": a["q"][0]}, ValueError, r"q must have 4 dimensions, got shape \(5, 8, 64\)"),
        (lambda a: {"q": a["q"].int()}, TypeError, "q must be float32 or float16 or bfloat16, got torch.int32"),
        (lambda a: {"k": a["k"].half()}, TypeError, "k must be float32, got torch.float16"),
        (lambda a: {"v": a["v"][:, :6]}, ValueError, r"v must be \[B, Sk, Hkv, D\] = k's shape \(2, 7, 2, 64\)"),
        (lambda a: {"k": a["k"][:1], "v": a["v"][:1]}, ValueError, "must have q's batch size B = 2"),
        (
            lambda a: {"k": torch.randn(2, 7, 3, 64), "v": torch.randn(2, 7, 3, 64)},
            ValueError,
            "query heads Hq=8 must be a nonzero multiple of the key/value heads Hkv=3",
        ),
        (
            lambda a: {"k": a["k"][..., :32], "v": a["v"][..., :32]},
            ValueError,
            "k's head dim 32 must equal q's head dim 64",
        ),
        (
            lambda a: {"q": a["q"].transpose(2, 3).contiguous().transpose(2, 3)},
            ValueError,
            "q must be contiguous in its last dimension",
        ),
        (lambda a: {"softmax_scale": -1.0}, ValueError, "softmax_scale must be finite and > 0, got -1.0"),
        (lambda a: {"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a float or None, got str"),
        (lambda a: {"causal": 1}, TypeError, "causal must be a bool, got int 1"),
        (lambda a: {"window_size": (4,)}, ValueError, r"window_size must be a pair \(left, right\), got \(4,\)"),
        (lambda a: {"window_size": (-2, 0)}, ValueError, r"window_size left must be in \[-1, inf\], got -2"),
        (lambda a: {"v": a["v"].to("meta")}, ValueError, "v must be on cpu like the other inputs, got meta"),
    ],
)
def test_flash_attn_func_bad_input(change, error, message):
    args = _dense()
    with pytest.raises(error, match=message):
        qwen_fast.flash_attn_func(**(args | change(args)))


def _varlen():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    return {
        "q": torch.randn(7, 4, 64),
        "k": torch.randn(7, 1, 64),
        "v": torch.randn(7, 1, 64),
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu.clone(),
        "max_seqlen_q": 4,
        "max_seqlen_k": 4,
    }


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"cu_seqlens_q": torch.tensor([0, 3, 3, 7])}, TypeError, "cu_seqlens_q must be int32, got torch.int64"),
        (
            {"cu_seqlens_q": torch.tensor([1, 3, 3, 7], dtype=torch.int32)},
            ValueError,
            r"cu_seqlens_q must start at 0, be non-decreasing and end at <= 7 tokens, got \[1, 3, 3, 7\]",
        ),
        ({"cu_seqlens_k": torch.tensor([0, 5, 3, 7], dtype=torch.int32)}, ValueError, "cu_seqlens_k must start at 0"),
        ({"cu_seqlens_k": torch.tensor([0, 3, 3, 9], dtype=torch.int32)}, ValueError, "end at <= 7 tokens"),
        (
            {"cu_seqlens_k": torch.tensor([0, 7], dtype=torch.int32), "max_seqlen_k": 7},
            ValueError,
            "must both hold B \\+ 1 offsets",
        ),
        ({"max_seqlen_q": 3}, ValueError, r"max_seqlen_q=3 is shorter than the longest sequence in cu_seqlens_q \(4\)"),
        ({"max_seqlen_k": -1}, ValueError, r"max_seqlen_k must be in \[0, inf\], got -1"),
        ({"q": torch.randn(7, 4, 64).half()}, TypeError, "k must be float16, got torch.float32"),
        ({"window_size": [1, 2, 3]}, ValueError, "window_size must be a pair"),
    ],
)
def test_flash_attn_varlen_func_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        qwen_fast.flash_attn_varlen_func(**(_varlen() | kwargs))


# --- kernels: every backend against the reference, masks, layouts, registration ------------------------------------

# (backend, dtypes it is tested in here). The interpreter cannot run bf16 tl.dot: Triton on CPU is fp32 and fp16.
KERNEL_BACKENDS = [
    ("cpu", ALL_DTYPES),
    pytest.param("triton", [torch.float32, torch.float16], marks=pytest.mark.interpret),
]


def _on(backend, fn, *args, **kwargs):
    """Run qwen_fast.<fn> with `backend` forced and prove that it ran there."""
    with qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
        out = getattr(qwen_fast, fn)(*args, **kwargs)
    assert trace == [(fn, backend)]
    return out


def _check_backend(backend, q, k, v, **options):
    """The backend's flash_attn_func against the reference (fp32 tight, fp16/bf16 the flash-attn budget); rows
    without a visible key must be exactly 0."""
    out = _on(backend, "flash_attn_func", q, k, v, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    _check(out, lambda *x: flash_attn_func(*x, **options), (q, k, v))
    causal, window = options.get("causal", False), options.get("window_size", (-1, -1))
    blind = ~_flash_mask(q.shape[1], k.shape[1], causal, window).any(dim=1)
    assert (out[:, blind] == 0).all()


# Interpreter-sized cases: (B, Sq, Sk, Hq, Hkv, D, causal, window): GQA 1/4/8, D 64/72/128/136, Sq != Sk both ways,
# causal, windows, rows with nothing to see (causal Sq > Sk; window (0, 0) with Sq > Sk).
TINY_CASES = [
    (1, 1, 7, 4, 4, 64, False, (-1, -1)),
    (2, 7, 33, 8, 1, 64, True, (-1, -1)),
    (1, 33, 7, 8, 2, 72, True, (-1, -1)),
    (1, 33, 33, 4, 1, 128, True, (3, -1)),
    (1, 33, 33, 8, 8, 72, False, (5, 2)),
    (1, 7, 33, 8, 1, 64, False, (0, 0)),
    (1, 33, 7, 4, 1, 64, False, (0, 0)),
    (1, 33, 1, 8, 2, 128, False, (-1, 3)),
    (1, 7, 9, 4, 2, 136, True, (-1, -1)),  # a masked head dim of 256 (the triton launcher pads a copy)
]


@pytest.mark.parametrize("case", TINY_CASES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend,dtypes", KERNEL_BACKENDS)
def test_kernel_matches_reference_small(backend, dtypes, dtype, case):
    if dtype not in dtypes:
        pytest.skip(f"{backend} is not tested in {dtype} here")
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window = case
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype)
    _check_backend(backend, q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (8, 2), (8, 1), (16, 1)])
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, causal, window",
    [(1, 300, True, (-1, -1)), (97, 97, True, (-1, -1)), (7, 300, False, (-1, -1)), (300, 97, True, (40, -1))],
)
def test_cpu_matches_reference(seqlen_q, seqlen_k, causal, window, heads_q, heads_kv, head_dim, dtype):
    q, k, v = _qkv(1, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype)
    _check_backend("cpu", q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("backend,dtypes", KERNEL_BACKENDS)
def test_kernel_reads_strided_inputs_and_scale(backend, dtypes):
    """q/k/v as views of transformers' [B, H, S, D] layout (token stride D, head stride S * D), custom scale."""
    dtype = dtypes[-1]
    q, k, v = (torch.randn(2, h, s, 64).to(dtype).transpose(1, 2) for h, s in ((8, 9), (2, 20), (2, 20)))
    _check_backend(backend, q, k, v, softmax_scale=0.3, causal=True)


def _packed(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, extra_q=0):
    q = torch.randn(sum(lens_q) + extra_q, heads_q, head_dim).to(dtype)
    k = torch.randn(sum(lens_k), heads_kv, head_dim).to(dtype)
    v = torch.randn(sum(lens_k), heads_kv, head_dim).to(dtype)
    cu_q = torch.tensor([0, *lens_q]).cumsum(0).int()
    cu_k = torch.tensor([0, *lens_k]).cumsum(0).int()
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "lens_q, lens_k, causal, window",
    [
        ([3, 0, 7, 1], [3, 0, 33, 0], True, (-1, -1)),
        ([1, 33, 2], [7, 5, 0], False, (2, 1)),
        ([0, 0], [0, 0], True, (-1, -1)),
    ],
)
@pytest.mark.parametrize("backend,dtypes", KERNEL_BACKENDS)
def test_kernel_varlen_matches_reference(backend, dtypes, lens_q, lens_k, causal, window, dtype):
    """Empty sequences, a sequence with queries but no keys (rows -> 0), and 2 trailing query rows outside every
    sequence (-> 0, as the reference)."""
    if dtype not in dtypes:
        pytest.skip(f"{backend} is not tested in {dtype} here")
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, 72, dtype, extra_q=2)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    options = {"causal": causal, "window_size": window}
    out = _on(backend, "flash_attn_varlen_func", *args, **options)
    assert out.shape == q.shape and not out.isnan().any() and (out[-2:] == 0).all()
    _check(out, lambda q, k, v: flash_attn_varlen_func(q, k, v, *args[3:], **options), (q, k, v))


def _native_args(dtype=torch.float32):
    q, k, v, cu_q, cu_k = _packed([5, 0, 3], [7, 2, 0], 8, 2, 64, dtype)
    return q, k, v, cu_q, cu_k, 5, 7, 0.125, True, 4, -1


def test_opcheck_native():
    torch.library.opcheck(torch.ops.qwen_fast.flash_attn_varlen_func.default, _native_args())
    torch.library.opcheck(torch.ops.qwen_fast.flash_attn_varlen_func.default, _native_args(torch.bfloat16))


@pytest.mark.interpret
def test_opcheck_triton():
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right = _native_args(torch.float16)
    torch.library.opcheck(torch.ops.qwen_fast_triton.flash_attn_varlen.default, _native_args(torch.float16))
    dense = _qkv(2, 3, 5, 4, 2, 64, torch.float16)
    torch.library.opcheck(torch.ops.qwen_fast_triton.flash_attn.default, (*dense, scale, causal, left, right))


def test_compiles_fullgraph_with_the_cpu_backend():
    q, k, v = _qkv(2, 9, 12, 8, 2, 64)

    @torch.compile(fullgraph=True, backend="inductor")
    def layer(q, k, v):
        return qwen_fast.flash_attn_func(q, k, v, causal=True) * 2

    torch._dynamo.reset()
    with qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as trace:
        out = layer(q, k, v)
    assert ("flash_attn_func", "cpu") in trace
    assert_close(out, 2 * flash_attn_func(q, k, v, causal=True))


def test_native_checks_its_arguments():
    """Direct torch.ops calls skip the Python checks: the C++ op names the bad argument and its value."""
    q, k, v, cu_q, cu_k, *rest = _native_args()
    op = torch.ops.qwen_fast.flash_attn_varlen_func
    with pytest.raises(
        RuntimeError, match="the query heads Hq=8 must be a nonzero multiple of the key/value heads Hkv=3"
    ):
        op(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_q, cu_k, *rest)
    with pytest.raises(RuntimeError, match="k and v must have q's dtype"):
        op(q, k.half(), v, cu_q, cu_k, *rest)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be non-decreasing"):
        op(q, k, v, cu_q, torch.tensor([0, 7, 2, 9], dtype=torch.int32), *rest)
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32"):
        op(q, k, v, cu_q.long(), cu_k, *rest)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [(32, 4, 128), (64, 4, 128), (16, 2, 256), (8, 8, 64)])
def test_triton_cuda_bf16(heads_q, heads_kv, head_dim, causal):
    q, k, v = (t.cuda() for t in _qkv(2, 1000, 1000, heads_q, heads_kv, head_dim, torch.bfloat16))
    _check_backend("triton", q, k, v, causal=causal)
    decode = q[:, -1:]
    _check_backend("triton", decode, k, v, causal=causal)
    cu = torch.tensor([0, 1000, 1000, 1700, 2000], dtype=torch.int32, device="cuda")
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    out = _on("triton", "flash_attn_varlen_func", *packed, cu, cu, 1000, 1000, causal=causal, window_size=(100, -1))
    ref = flash_attn_varlen_func(*[t.float() for t in packed], cu, cu, 1000, 1000, causal=causal, window_size=(100, -1))
    low = flash_attn_varlen_func(*packed, cu, cu, 1000, 1000, causal=causal, window_size=(100, -1))
    assert_within_budget(out, ref, low)
