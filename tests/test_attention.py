"""qwen_fast.reference.attention against torch SDPA, explicit masks, and transformers' attention functions."""

import pytest
import torch
import torch.nn.functional as F
from backends import backend_params
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
        (lambda a: {"dropout_p": 0.5}, ValueError, "dropout_p=0.5 is not supported: dropout is a training feature"),
        (lambda a: {"dropout_p": None}, TypeError, "dropout_p must be a float, got NoneType None"),
        (lambda a: {"softcap": -1.0}, ValueError, r"softcap must be finite and >= 0 \(0.0: no capping\), got -1.0"),
        (lambda a: {"softcap": "30"}, TypeError, "softcap must be a float, got str '30'"),
        (lambda a: {"alibi_slopes": torch.ones(8)}, ValueError, "alibi_slopes is not supported by qwen_fast"),
        (lambda a: {"deterministic": 1}, TypeError, "deterministic must be a bool, got int 1"),
        (lambda a: {"return_attn_probs": "yes"}, TypeError, "return_attn_probs must be a bool, got str 'yes'"),
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
        ({"dropout_p": 0.1}, ValueError, "dropout_p=0.1 is not supported: dropout is a training feature"),
        ({"softcap": float("inf")}, ValueError, "softcap must be finite and >= 0"),
        ({"block_table": torch.zeros(3, 1, dtype=torch.int32)}, ValueError, "block_table is not supported"),
    ],
)
def test_flash_attn_varlen_func_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        qwen_fast.flash_attn_varlen_func(**(_varlen() | kwargs))


# --- kernels: every backend on every sample (masks, layouts, registration) is tests/test_ops.py -------------------


def _native_args():
    q, k, v = torch.randn(8, 8, 64), torch.randn(9, 2, 64), torch.randn(9, 2, 64)
    cu_q, cu_k = torch.tensor([0, 5, 5, 8], dtype=torch.int32), torch.tensor([0, 7, 9, 9], dtype=torch.int32)
    return q, k, v, cu_q, cu_k, 5, 7, 0.125, True, 4, -1, 0.0, True


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
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0, got -1"):
        op(q, k, v, cu_q, cu_k, *rest[:-2], -1.0, True)


# --- flash-attn's positional order and inference arguments (dropout_p, softcap, return_attn_probs) ------------------


def test_fourth_positional_argument_is_dropout_p():
    """flash-attn's positional calls mean the same here: flash_attn_func(q, k, v, 0.1, causal=True) once took 0.1 as
    the softmax scale; it now refuses dropout, and (q, k, v, 0.0, scale, causal) is dropout 0 then the scale."""
    q, k, v = _qkv(2, 7, 7, 8, 2, 32)
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported: dropout is a training feature"):
        qwen_fast.flash_attn_func(q, k, v, 0.1, causal=True)
    positional = qwen_fast.flash_attn_func(q, k, v, 0.0, 0.3, True)
    assert_close(positional, _sdpa(q, k, v, is_causal=True, scale=0.3))
    cu = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        qwen_fast.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 7, 7, 0.1, causal=True)
    varlen = qwen_fast.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 7, 7, 0.0, 0.3, True)
    assert_close(varlen, positional[0])


def _explicit_scores(q, k, scale, softcap, mask):
    """fp32 [B, Hq, Sq, Sk] scores written out (GQA by repeating k's heads), capped, masked with -inf."""
    k = k.float().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("backend, device", backend_params("flash_attn_func"))
def test_softcap_and_lse_match_the_formula(backend, device):
    """softcap * tanh(scale * q.k / softcap), then the softmax; lse = logsumexp of those scores (fp32, natural log),
    +inf on the rows that see no key (causal with Sq > Sk: the first Sq - Sk rows), as flash-attn 2.8.3 writes."""
    q, k, v = (t.to(device) for t in _qkv(2, 9, 4, 4, 2, 32))
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out, lse, s_dmask = qwen_fast.flash_attn_func(
            q, k, v, softmax_scale=0.5, causal=True, softcap=2.0, deterministic=True, return_attn_probs=True
        )
    assert [ran for op, ran in calls if op == "flash_attn_func"] == [backend]
    mask = _flash_mask(9, 4, True, (-1, -1)).to(device)
    scores = _explicit_scores(q, k, 0.5, 2.0, mask)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v.float().repeat_interleave(2, dim=2))
    assert_close(out, expected)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    assert torch.isposinf(lse[:, :, :5]).all() and (out[:, :5] == 0).all()
    assert_close(lse[:, :, 5:], torch.logsumexp(scores[:, :, 5:], dim=-1))
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype  # flash-attn's S_dmask when dropout_p == 0


@pytest.mark.parametrize("backend, device", backend_params("flash_attn_varlen_func"))
def test_varlen_lse_layout_and_empty_rows(backend, device):
    """softmax_lse [Hq, Tq] (flash-attn's varlen layout): each sequence's rows equal its dense lse; rows of an empty
    key sequence and rows outside every sequence are +inf."""
    lens_q, lens_k = [3, 2, 4], [5, 0, 4]
    q = torch.randn(sum(lens_q) + 1, 4, 32, device=device)  # one row outside every sequence
    k, v = torch.randn(sum(lens_k), 1, 32, device=device), torch.randn(sum(lens_k), 1, 32, device=device)
    cu_q = torch.tensor([0, 3, 5, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 5, 9], dtype=torch.int32, device=device)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out, lse, _ = qwen_fast.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 4, 5, causal=True, softcap=1.5, return_attn_probs=True
        )  # fmt: skip
    assert [ran for op, ran in calls if op == "flash_attn_varlen_func"] == [backend]
    assert lse.shape == (4, 10) and lse.dtype == torch.float32
    assert torch.isposinf(lse[:, 3:5]).all() and torch.isposinf(lse[:, 9]).all()
    for rows, keys, length in ((slice(0, 3), slice(0, 5), 3), (slice(5, 9), slice(5, 9), 4)):
        mask = _flash_mask(length, keys.stop - keys.start, True, (-1, -1)).to(device)
        scores = _explicit_scores(q[None, rows], k[None, keys], 32**-0.5, 1.5, mask)
        assert_close(lse[:, rows], torch.logsumexp(scores, dim=-1)[0])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend, device", backend_params("flash_attn_func"))
def test_softcap_saturates_without_nan(backend, device):
    """Scores in the thousands: tanh saturates at +-1 in every kernel's formulation (exp overflow or clamping gives
    +-softcap, never NaN), as torch.tanh does in the reference."""
    q = torch.randn(1, 16, 4, 32, device=device) * 100
    k, v = q[:, :, :2].clone(), torch.randn(1, 16, 2, 32, device=device)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out, lse, _ = qwen_fast.flash_attn_func(q, k, v, softcap=5.0, return_attn_probs=True)
    assert [ran for op, ran in calls if op == "flash_attn_func"] == [backend]
    expected, expected_lse, _ = flash_attn_func(q, k, v, softcap=5.0, return_attn_probs=True)
    assert out.isfinite().all() and lse.isfinite().all()
    assert_close(out, expected)
    assert_close(lse, expected_lse)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seqlen_q, heads_q, causal, window_size", [(1, 8, True, (-1, -1)), (2, 8, False, (5, 3))])
def test_decode_shaped_flash_attn_func_runs_split_k(monkeypatch, seqlen_q, heads_q, causal, window_size, dtype):
    """Sq * G <= 16 (DynamicCache decode) goes to the split-K kernel (3 splits over 700 keys: 2 programs, the
    interpreter's 4 "SMs"), with
    flash_attn_func's results: out within the budget, lse as the reference's."""
    from qwen_fast.kernels import paged_attention as paged

    splits, split_count = [], paged.num_splits
    monkeypatch.setattr(paged, "num_splits", lambda *a: splits.append(split_count(*a)) or splits[-1])
    q, k, v = _qkv(2, seqlen_q, 700, heads_q, 1, 64, dtype)
    with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        out, lse, _ = qwen_fast.flash_attn_func(q, k, v, causal=causal, window_size=window_size, return_attn_probs=True)
    assert calls == [("flash_attn_func", "triton")] and splits == [3]
    _check(out, lambda *x: flash_attn_func(*x, causal=causal, window_size=window_size), (q, k, v))
    assert_close(lse, flash_attn_func(q, k, v, causal=causal, window_size=window_size, return_attn_probs=True)[1])


@pytest.mark.interpret
def test_sm90_prefill_tile_matches_reference(monkeypatch):
    """The sm_90 prefill tile (BLOCK_M 128, 8 warps at head dim 128) computes what the sm_80 one does: run it under
    the interpreter by reporting compute capability 9.0."""
    from qwen_fast.kernels import attention as kernels

    assert kernels._config(torch.float16, 128, 200, True, 90)["BLOCK_M"] == 128
    assert kernels._config(torch.float16, 128, 200, True, 80)["BLOCK_M"] == 64
    monkeypatch.setattr(kernels, "device_arch", lambda device: 90)
    q, k, v = _qkv(1, 130, 130, 2, 1, 128, torch.float16)
    with qwen_fast.use_backend("triton"):
        out = qwen_fast.flash_attn_func(q, k, v, causal=True)
    _check(out, lambda *x: flash_attn_func(*x, causal=True), (q, k, v))


def test_head_dim_256_prefill_tile_matches_reference():
    """The 16-bit prefill tile at head dim 256 (32 rows x 16 keys, chosen in place of 32 x 32, which spilled on
    sm_80): two row tiles, full and masked key tiles, causal (fp16: the interpreter cannot run bf16 dots)."""
    from qwen_fast.kernels import attention as kernels

    assert kernels._config(torch.float16, 256, 40, True, 80)["BLOCK_N"] == 16
    q, k, v = _qkv(1, 20, 37, 2, 1, 256, torch.float16)
    with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        out = qwen_fast.flash_attn_func(q, k, v, causal=True)
    assert ("flash_attn_func", "triton") in calls
    _check(out, lambda *x: flash_attn_func(*x, causal=True), (q, k, v))
