"""flash_attn_func and flash_attn_varlen_func: GQA attention with flash-attn's signatures and semantics."""

import math

import torch

from qwen_fast.reference import attention as reference

from . import flash_attn_backend
from ._checks import (
    FLOAT_DTYPES,
    Require,
    check_int,
    check_last_dim_contiguous,
    check_shape,
    check_tensor,
    raise_unless,
    traced,
)
from ._dispatch import INTERPRETER_DOT, Op
from ._library import define_triton_op, launcher, native_op

# The kernels take the softmax scale resolved (None -> D ** -0.5), the window as two ints (-1: unbounded), the
# softcap (0: off) and whether to return the softmax_lse; they return (out, softmax_lse), the lse empty ([0]) unless
# asked for (the Triton kernel compiles the lse and softcap code only into the variant that needs them).


def _lse_shape(return_lse: bool, *shape: int) -> tuple[int, ...]:
    return shape if return_lse else (0,)


def _fake_flash_attn(q, k, v, softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                     return_lse: bool):  # fmt: skip
    check_dense_args(q, k, v, traced)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(_lse_shape(return_lse, q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _fake_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                            softmax_scale: float, causal: bool, window_left: int, window_right: int,
                            softcap: float, return_lse: bool):  # fmt: skip
    check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, traced)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(_lse_shape(return_lse, q.shape[1], q.shape[0]), dtype=torch.float32)


_launch_flash_attn = launcher("attention", "flash_attn_func")
_launch_flash_attn_varlen = launcher("attention", "flash_attn_varlen_func")


def _flash_attn_launch(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse):
    return _launch_flash_attn(q, k, v, softmax_scale, causal, (window_left, window_right), softcap, return_lse)


def _flash_attn_varlen_launch(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_left, window_right,
                              softcap, return_lse):  # fmt: skip
    return _launch_flash_attn_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, (window_left, window_right), softcap, return_lse
    )  # fmt: skip


_flash_attn_triton = define_triton_op(
    "flash_attn(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int window_left, int window_right, "
    "float softcap, bool return_lse) -> (Tensor, Tensor)",
    _flash_attn_launch,
    _fake_flash_attn,
)
_flash_attn_varlen_triton = define_triton_op(
    "flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
    "bool return_lse) -> (Tensor, Tensor)",
    _flash_attn_varlen_launch,
    _fake_flash_attn_varlen,
)
_flash_attn_varlen_native = native_op("flash_attn_varlen_func", _fake_flash_attn_varlen)


def _flash_attn_native(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse):
    """The dense batch through the varlen op: B sequences of Sq queries and Sk keys (q/k/v viewed as [B*S, H, D]);
    its lse [Hq, B * Sq] is laid out again as flash_attn_func's [B, Hq, Sq]."""
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    device = q.device
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seqlen_q
    cu_k = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seqlen_k
    out, lse = _flash_attn_varlen_native(
        q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), cu_q, cu_k,
        seqlen_q, seqlen_k, softmax_scale, causal, window_left, window_right, softcap, return_lse,
    )  # fmt: skip
    if return_lse:
        lse = lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1).contiguous()
    return out.view(q.shape), lse


def _reference_flash_attn(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse):
    out, lse, _ = reference.flash_attn_func(
        q, k, v, 0.0, softmax_scale, causal, (window_left, window_right), softcap, return_attn_probs=True
    )  # fmt: skip
    return out, lse if return_lse else lse.new_empty(0)


def _reference_flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_left, window_right,
                                 softcap, return_lse):  # fmt: skip
    out, lse, _ = reference.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale, causal, (window_left, window_right), softcap,
        return_attn_probs=True,
    )  # fmt: skip
    return out, lse if return_lse else lse.new_empty(0)


# Attention is Triton's job on CUDA (no CUDA C++ kernel), or flash-attn's where it is installed and takes the call
# (flash_attn_backend.py); the C++ extension's flash loop on CPU. One native op, flash_attn_varlen_func, serves both
# functions on CPU.
ATTENTION_ORDER = {"cuda": ("flash_attn", "triton", "torch"), "cpu": ("cpu", "torch")}
FLASH_ATTN = Op(
    "flash_attn_func",
    {
        "triton": _flash_attn_triton,
        "flash_attn": flash_attn_backend.flash_attn,
        "cpu": _flash_attn_native,
        "torch": _reference_flash_attn,
    },
    ATTENTION_ORDER,
    native_op="flash_attn_varlen_func",
    interpreter_limit=INTERPRETER_DOT,
    backend_limits={"flash_attn": flash_attn_backend.dense_limit},
)
FLASH_ATTN_VARLEN = Op(
    "flash_attn_varlen_func",
    {
        "triton": _flash_attn_varlen_triton,
        "flash_attn": flash_attn_backend.flash_attn_varlen,
        "cpu": _flash_attn_varlen_native,
        "torch": _reference_flash_attn_varlen,
    },
    ATTENTION_ORDER,
    interpreter_limit=INTERPRETER_DOT,
    backend_limits={"flash_attn": flash_attn_backend.dense_limit},
)


def check_softcap(softcap: object) -> float:
    """flash-attn's softcap: a float >= 0 (0: off). flash-attn treats a negative one as off; here it is refused,
    as a negative cap is most likely a mistake."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__} {softcap!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0.0: no capping), got {softcap}")
    return float(softcap)


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_attention_options(softmax_scale: object, causal: object, window_size: object) -> None:
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    for side, value in zip(("left", "right"), window_size, strict=True):
        check_int(f"window_size {side}", value, low=-1)


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, require: Require = raise_unless) -> None:
    """q [..., Hq, D], k and v [..., Hkv, D] with Hq a multiple of Hkv, one head dim, contiguous last dims."""
    hq, hkv = q.shape[-2], k.shape[-2]
    for ok in (lambda: hkv != 0, lambda: hq % hkv == 0):  # the second only once the first holds
        require(
            ok(),
            ValueError,
            lambda: f"the query heads Hq={hq} must be a nonzero multiple of the key/value heads Hkv={hkv}",
        )
    require(
        k.shape[-1] == q.shape[-1],
        ValueError,
        lambda: f"k's head dim {k.shape[-1]} must equal q's head dim {q.shape[-1]}",
    )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, tensor, require)


def check_dense_args(q: object, k: object, v: object, require: Require = raise_unless) -> None:
    """flash_attn_func's tensor contract (the eager check and the fake; `require`: see _checks.py)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, require=require)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device, require=require)
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device, require=require)
    check_shape("v", v, k.shape, "[B, Sk, Hkv, D] = k's shape", require)
    require(
        k.shape[0] == q.shape[0],
        ValueError,
        lambda: f"k [B, Sk, Hkv, D] = {tuple(k.shape)} must have q's batch size B = {q.shape[0]}",
    )
    check_heads(q, k, v, require)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over a dense batch: flash-attn 2.8.3's `flash_attn_func`, same parameters in the same order.

    GQA/MQA: query head h reads key/value head h // (Hq // Hkv). Causal masking with Sq != Sk is aligned
    bottom-right; window_size = (left, right) limits keys to [i + Sk - Sq - left, i + Sk - Sq + right] (-1:
    unbounded). Softmax and accumulation in fp32; a query row with no visible key outputs 0.

    Args:
        q: [B, Sq, Hq, D] float32/float16/bfloat16.
        k, v: [B, Sk, Hkv, D], q's dtype.
        dropout_p: 0.0 only (inference: any other value raises a ValueError, never a silent change of meaning).
        softmax_scale: default D ** -0.5.
        causal, window_size: masking as above.
        softcap: > 0 caps the scores as flash-attn does, softcap * tanh(q.k * softmax_scale / softcap); 0.0 is off.
        alibi_slopes: None only (ALiBi is not supported).
        deterministic: accepted; every backend's forward is deterministic anyway (no atomics, fixed order).
        return_attn_probs: also return softmax_lse and S_dmask, as flash-attn.

    Returns:
        [B, Sq, Hq, D] in q's dtype. With return_attn_probs: (out, softmax_lse fp32 [B, Hq, Sq] = the natural-log
        log-sum-exp of each row's scaled (and capped) scores, +inf for a row with no visible key as flash-attn,
        S_dmask = an empty tensor of q's dtype, which is what flash-attn returns when dropout_p is 0).

    Example:
        >>> q, k, v = torch.randn(2, 5, 8, 64), torch.randn(2, 7, 2, 64), torch.randn(2, 7, 2, 64)
        >>> qwen_fast.flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 5, 8, 64])
        >>> out, lse, _ = qwen_fast.flash_attn_func(q, k, v, softcap=30.0, return_attn_probs=True)
        >>> lse.shape, lse.dtype
        (torch.Size([2, 8, 5]), torch.float32)
    """
    check_dense_args(q, k, v)
    reference.check_inference_only(dropout_p, alibi_slopes)
    check_attention_options(softmax_scale, causal, window_size)
    cap = check_softcap(softcap)
    _check_flags(deterministic=deterministic, return_attn_probs=return_attn_probs)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = FLASH_ATTN(q.device, q, k, v, scale, causal, *window_size, cap, return_attn_probs)
    return (out, lse, q.new_empty(0)) if return_attn_probs else out


def check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, require=raise_unless) -> None:
    """flash_attn_varlen_func's tensor contract (the eager check and the fake; `require`: see _checks.py)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, require=require)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, require=require)
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device, require=require)
    check_shape("v", v, k.shape, "[Tk, Hkv, D] = k's shape", require)
    check_heads(q, k, v, require)
    check_int("max_seqlen_q", max_seqlen_q, low=0, require=require)
    check_int("max_seqlen_k", max_seqlen_k, low=0, require=require)
    for name, cu_seqlens in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device, require=require)
        require(
            cu_seqlens.shape[0] >= 1,
            ValueError,
            lambda: f"{name} must hold B + 1 >= 1 offsets, got shape {tuple(cu_seqlens.shape)}",  # noqa: B023
        )
    require(
        cu_seqlens_k.shape[0] == cu_seqlens_q.shape[0],
        ValueError,
        lambda: (
            f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} and cu_seqlens_q {tuple(cu_seqlens_q.shape)} "
            "must both hold B + 1 offsets"
        ),
    )


def check_cu_offsets(name: str, cu_seqlens: torch.Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    """The offsets start at 0, do not decrease, end at <= `total`, and no sequence is longer than `max_seqlen`
    (checked on CPU only: on CUDA that would cost a host sync)."""
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)) or offsets[-1] > total:
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at <= {total} tokens, got {offsets}")
    longest = max((b - a for a, b in zip(offsets, offsets[1:], strict=False)), default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is shorter than the longest sequence in {name} ({longest})")


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over sequences packed along the token dimension: flash-attn 2.8.3's `flash_attn_varlen_func`.

    Sequence b owns queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys cu_seqlens_k[b]:cu_seqlens_k[b+1]; masking
    is per sequence, as in flash_attn_func. Empty sequences are allowed.

    Args:
        q: [Tq, Hq, D] float32/float16/bfloat16.
        k, v: [Tk, Hkv, D], q's dtype.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] offsets, starting at 0, non-decreasing.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (ints >= 0).
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as flash_attn_func.
        return_attn_probs: also return (softmax_lse fp32 [Hq, Tq], S_dmask), as flash_attn_func; query rows outside
            every sequence have lse +inf.
        block_table: None only. Paged keys in varlen are not supported: use flash_attn_with_kvcache.

    Returns:
        [Tq, Hq, D] in q's dtype, or (out, softmax_lse, empty S_dmask) with return_attn_probs.

    Example:
        >>> cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
        >>> q, k, v = torch.randn(7, 4, 64), torch.randn(7, 1, 64), torch.randn(7, 1, 64)
        >>> qwen_fast.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True).shape
        torch.Size([7, 4, 64])
    """
    check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_cu_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    check_cu_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    reference.check_inference_only(dropout_p, alibi_slopes)
    if block_table is not None:
        raise ValueError(
            "block_table is not supported by flash_attn_varlen_func (paged keys in varlen); pass None, or use "
            "flash_attn_with_kvcache for paged caches"
        )
    check_attention_options(softmax_scale, causal, window_size)
    cap = check_softcap(softcap)
    _check_flags(deterministic=deterministic, return_attn_probs=return_attn_probs)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = FLASH_ATTN_VARLEN(
        q.device, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, *window_size, cap,
        return_attn_probs,
    )  # fmt: skip
    return (out, lse, q.new_empty(0)) if return_attn_probs else out
