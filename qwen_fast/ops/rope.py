"""RoPE ops: rotary_embedding, and qk_norm_rope_and_cache (Qwen3's q/k RMSNorm + RoPE + paged KV-cache write fused).

The registered ops are out of place for query and key (new tensors, like functional torch.compile graphs);
qk_norm_rope_and_cache mutates only the caches (marked `Tensor(a!)` in its schema). The public rotary_embedding has
vLLM's signature and writes the rotated values back into query and key (in place, as vLLM's). Roundings: the references'
(qwen_fast/reference/rope.py, qk_norm_rope_and_cache), at the same points in every kernel (csrc/rope.h,
kernels/rope.py). rotary_embedding's CPU kernel gives the reference's bits (the tests check it).
"""

import torch

from qwen_fast.reference import rope as reference

from ._checks import (
    FLOAT_DTYPES,
    Require,
    check_int,
    check_last_dim_contiguous,
    check_shape,
    check_tensor,
    raise_unless,
    same_sizes,
    traced,
)
from ._dispatch import INTERPRETER_CASTS, NATIVE_FIRST, Op
from ._library import define_triton_op, launcher, native_op


def _fake_rotary_embedding(positions, query, key, cos_sin_cache, is_neox) -> tuple[torch.Tensor, torch.Tensor]:
    check_rope_args(positions, query, key, cos_sin_cache, is_neox, traced)
    return query.new_empty(query.shape), key.new_empty(key.shape)


def _fake_qk_norm_rope_and_cache(
    query, key, value, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, key_cache, value_cache,
    slot_mapping, is_neox,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    check_qk_norm_rope_args(
        query, key, value, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, key_cache, value_cache,
        slot_mapping, is_neox, traced,
    )  # fmt: skip
    return query.new_empty(query.shape), key.new_empty(key.shape)


_rotary_embedding_triton = define_triton_op(
    "rotary_embedding(Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache, bool is_neox) "
    "-> (Tensor, Tensor)",
    launcher("rope", "rotary_embedding"),
    _fake_rotary_embedding,
)
_qk_norm_rope_and_cache_triton = define_triton_op(
    "qk_norm_rope_and_cache(Tensor query, Tensor key, Tensor value, Tensor q_norm_weight, Tensor k_norm_weight, "
    "float eps, Tensor positions, Tensor cos_sin_cache, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_mapping, bool is_neox) -> (Tensor, Tensor)",
    launcher("rope", "qk_norm_rope_and_cache"),
    _fake_qk_norm_rope_and_cache,
)
_rotary_embedding_native = native_op("rotary_embedding", _fake_rotary_embedding)
_qk_norm_rope_and_cache_native = native_op("qk_norm_rope_and_cache", _fake_qk_norm_rope_and_cache)

ROTARY_EMBEDDING = Op(
    "rotary_embedding",
    {
        "cuda": _rotary_embedding_native,
        "triton": _rotary_embedding_triton,
        "cpu": _rotary_embedding_native,
        "torch": reference.apply_rotary_emb,
    },
    NATIVE_FIRST,
    interpreter_limit=INTERPRETER_CASTS,
)
QK_NORM_ROPE_AND_CACHE = Op(
    "qk_norm_rope_and_cache",
    {
        "cuda": _qk_norm_rope_and_cache_native,
        "triton": _qk_norm_rope_and_cache_triton,
        "cpu": _qk_norm_rope_and_cache_native,
        "torch": reference.qk_norm_rope_and_cache,
    },
    NATIVE_FIRST,
    interpreter_limit=INTERPRETER_CASTS,
)


def _check_index_range(name: str, index: torch.Tensor, high: int, what: str, allow_negative: bool = False) -> None:
    """Entries of `index` lie below `high` (and are >= 0 unless allow_negative). CPU only: on CUDA the check would
    need a host sync (the CPU kernels always check)."""
    if index.device.type != "cpu" or index.numel() == 0 or torch.compiler.is_compiling():
        return
    low, top = int(index.min()), int(index.max())
    if top >= high or (low < 0 and not allow_negative):
        raise ValueError(f"{name} holds values in [{low}, {top}], outside {what}")


def check_rope_args(positions, query, key, cos_sin_cache, is_neox, require: Require = raise_unless) -> None:
    """rotary_embedding's contract (the eager check and the fake; `require`: see _checks.py): query [..., H, D] in a
    float dtype; key None or [..., Hkv, D] like query; positions int64 [...]; cos_sin_cache [P, D] fp32 or query's
    dtype."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES, require=require)
    require(
        query.dim() in (3, 4),
        ValueError,
        lambda: f"query must be [T, Hq, D] or [B, S, Hq, D], got shape {tuple(query.shape)}",
    )
    head_dim, device = query.shape[-1], query.device
    require(head_dim % 2 == 0, ValueError, lambda: f"query's head_dim must be even (pairs are rotated), got {head_dim}")
    check_tensor("positions", positions, dtypes=(torch.int64,), device=device, require=require)
    check_shape("positions", positions, query.shape[:-2], "[T] or [B, S] = query's leading dims", require)
    check_tensor(
        "cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32, query.dtype), device=device, require=require
    )
    require(
        (cos_sin_cache.shape[1] == head_dim) & cos_sin_cache.is_contiguous(),
        ValueError,
        lambda: (
            f"cos_sin_cache must be contiguous [max_position, D = {head_dim}], got {tuple(cos_sin_cache.shape)} "
            f"with strides {cos_sin_cache.stride()}"
        ),
    )
    require(
        isinstance(is_neox, bool),
        TypeError,
        lambda: f"is_neox must be a bool, got {type(is_neox).__name__} {is_neox!r}",
    )
    check_last_dim_contiguous("query", query, require)
    if key is not None:
        _check_heads("key", key, query, require)


def _check_heads(name: str, x: torch.Tensor, query: torch.Tensor, require: Require) -> None:
    """x [..., H, D] with query's leading dims, D, dtype and device."""
    check_tensor(name, x, ndim=query.dim(), dtypes=(query.dtype,), device=query.device, require=require)
    require(
        same_sizes(x.shape[:-2], query.shape[:-2]) & (x.shape[-1] == query.shape[-1]),
        ValueError,
        lambda: (
            f"{name} must be [..., H, D] with query's {tuple(query.shape)} leading dims and D, got {tuple(x.shape)}"
        ),
    )
    check_last_dim_contiguous(name, x, require)


def check_qk_norm_rope_args(
    query, key, value, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, key_cache, value_cache,
    slot_mapping, is_neox, require: Require = raise_unless,
) -> None:  # fmt: skip
    """qk_norm_rope_and_cache's contract (the eager check and the fake; `require`: see _checks.py)."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, require=require)
    check_rope_args(positions, query, key, cos_sin_cache, is_neox, require)
    _check_heads("value", value, query, require)
    check_shape("value", value, key.shape, "[T, Hkv, D] = key's shape", require)
    head_dim, device = query.shape[-1], query.device
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        check_tensor(name, weight, ndim=1, dtypes=(query.dtype,), device=device, require=require)
        check_shape(name, weight, (head_dim,), "[D] =", require)
        check_last_dim_contiguous(name, weight, require)
    require(
        not isinstance(eps, bool) and isinstance(eps, (int, float)),
        TypeError,
        lambda: f"eps must be a float, got {type(eps).__name__} {eps!r}",
    )
    require(eps >= 0, ValueError, lambda: f"eps must be >= 0, got {eps!r}")
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(query.dtype,), device=device, require=require)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=(query.dtype,), device=device, require=require)
    require(
        same_sizes(key_cache.shape[2:], key.shape[1:]),
        ValueError,
        lambda: (
            f"key_cache [num_blocks, block_size, Hkv, D] = {tuple(key_cache.shape)} does not match key "
            f"[T, Hkv, D] = {tuple(key.shape)} in Hkv and D"
        ),
    )
    require(
        same_sizes(value_cache.shape, key_cache.shape) & same_sizes(value_cache.stride(), key_cache.stride()),
        ValueError,
        lambda: (
            f"value_cache must have key_cache's shape {tuple(key_cache.shape)} and strides {key_cache.stride()}, "
            f"got {tuple(value_cache.shape)} and {value_cache.stride()}"
        ),
    )
    check_last_dim_contiguous("key_cache", key_cache, require)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device, require=require)
    check_shape("slot_mapping", slot_mapping, query.shape[:1], "[T] =", require)


def _check_positions(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    rows = cos_sin_cache.shape[0]
    _check_index_range("positions", positions, rows, f"cos_sin_cache's [0, {rows})")


def _head_rows(name: str, x: object, positions: torch.Tensor, head_size: int) -> torch.Tensor:
    """x [*P, H * head_size] or [*P, H, head_size] (P = positions' shape, vLLM's layouts) as a [*P, H, head_size]
    view of the same memory."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, device=positions.device)
    lead = positions.dim()
    if x.dim() == lead + 1 and x.shape[:lead] == positions.shape and x.shape[-1] % head_size == 0:
        return x.unflatten(-1, (-1, head_size))
    if x.dim() == lead + 2 and x.shape[:lead] == positions.shape and x.shape[-1] == head_size:
        return x
    raise ValueError(
        f"{name} must be [*P, H * head_size] or [*P, H, head_size] with P = positions' shape {tuple(positions.shape)} "
        f"and head_size = {head_size}, got shape {tuple(x.shape)}"
    )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    rope_dim_offset: int = 0,
    inverse: bool = False,
) -> None:
    """Rotate query and key in place by their tokens' positions: vLLM's `rotary_embedding` (vllm/_custom_ops.py).

    Each head's dims [rope_dim_offset, rope_dim_offset + rot_dim) are rotated (rot_dim = cos_sin_cache's width;
    partial rotary when rot_dim < head_size), the others are left as they are. The kernels compute out of place and
    the result is copied back, so a call costs one extra read and write of the rotated dims.

    Args:
        positions: int64 [T] (packed tokens) or [B, S].
        query: [*P, Hq * head_size] or [*P, Hq, head_size] (P = positions' shape), float32/float16/bfloat16, head
            dim contiguous; MUTATED.
        key: like query with Hkv heads (query's dtype), or None (query alone is rotated); MUTATED.
        head_size: the head dim D, an int; checked against query's and key's shapes.
        cos_sin_cache: contiguous [max_position, rot_dim] ([cos | sin], rot_dim even, rope_dim_offset + rot_dim <=
            head_size), e.g. `qwen_fast.reference.compute_cos_sin_cache` (YaRN included): float32 (fp32 math, one
            rounding) or query's dtype (transformers' per-operation rounding).
        is_neox: rotate-half pairs (True: Qwen, Llama) or interleaved pairs (False: GPT-J).
        rope_dim_offset: the first rotated dim of each head (vLLM's; default 0).
        inverse: rotate by the negative angles, undoing a rotation (vLLM's; default False).

    Returns:
        None (query and key hold the result).

    Example:
        >>> cache = qwen_fast.reference.compute_cos_sin_cache(64, 4096, 1e6)
        >>> q, k = torch.randn(5, 8 * 64), torch.randn(5, 2, 64)
        >>> q0 = q.clone()
        >>> qwen_fast.rotary_embedding(torch.arange(5), q, k, 64, cache, True)
        >>> torch.equal(q[0], q0[0]), torch.equal(q[1], q0[1])  # position 0 is the identity
        (True, False)
    """
    check_tensor("positions", positions, dtypes=(torch.int64,))
    check_int("head_size", head_size, low=1)
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be [T] or [B, S], got shape {tuple(positions.shape)}")
    query_heads = _head_rows("query", query, positions, head_size)
    key_heads = None if key is None else _head_rows("key", key, positions, head_size)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32, query.dtype), device=query.device)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim > head_size:
        raise ValueError(
            f"cos_sin_cache [max_position, rot_dim] must have rot_dim <= head_size={head_size}, got {rot_dim}"
        )
    check_int("rope_dim_offset", rope_dim_offset, low=0, high=head_size - rot_dim)
    if not isinstance(inverse, bool):
        raise TypeError(f"inverse must be a bool, got {type(inverse).__name__} {inverse!r}")
    window = slice(rope_dim_offset, rope_dim_offset + rot_dim)
    query_part = query_heads[..., window]
    key_part = None if key_heads is None else key_heads[..., window]
    tokens, flat_positions, table = positions.numel(), positions.reshape(-1), cos_sin_cache
    _check_positions(flat_positions, cos_sin_cache)
    if inverse:  # the tokens' own rows with the sines negated: a rotation by -angle
        rows = cos_sin_cache.index_select(0, flat_positions)
        table = torch.cat((rows[:, : rot_dim // 2], -rows[:, rot_dim // 2 :]), dim=1)
        flat_positions = torch.arange(tokens, device=positions.device)
    flat_query = query_part.reshape(tokens, query_part.shape[-2], rot_dim)  # a view where the layout allows
    if key_part is None:  # a key of no heads: the kernels then rotate query alone
        flat_key = query.new_empty(tokens, 0, rot_dim)
    else:
        flat_key = key_part.reshape(tokens, key_part.shape[-2], rot_dim)
    check_rope_args(flat_positions, flat_query, flat_key, table, is_neox)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, cos_sin_cache)):
        flat_query, flat_key = flat_query.clone(), flat_key.clone()  # autograd saves them: not the memory written below
    q_out, k_out = ROTARY_EMBEDDING(query.device, flat_positions, flat_query, flat_key, table, is_neox)
    query_part.copy_(q_out.view(query_part.shape))
    if key_part is not None:
        key_part.copy_(k_out.view(key_part.shape))


def qk_norm_rope_and_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 attention's q/k path in one pass: per-head RMSNorm of q and k, RoPE, k and v into the paged caches.

    Rounds where `qwen_fast.reference.qk_norm_rope_and_cache` rounds (rms_norm with Qwen3's casts, apply_rotary_emb,
    reshape_and_cache); only the order of the fp32 sum of squares differs (ulp-level: in fp16 about 3 to 11 elements
    in 10,000 one ulp apart). Each new q/k/v element is read once, instead of once per pass of the four-op chain.

    Args:
        query: [T, Hq, D] float32/float16/bfloat16, head dim contiguous (e.g. a view into a fused qkv projection).
        key, value: [T, Hkv, D], query's dtype.
        q_norm_weight, k_norm_weight: [D], query's dtype (the model's q_norm / k_norm weights).
        eps: RMSNorm epsilon, a float >= 0 (Qwen3: 1e-6).
        positions: int64 [T], each in [0, max_position).
        cos_sin_cache: contiguous [max_position, D], float32 or query's dtype (see rotary_embedding).
        key_cache, value_cache: [num_blocks, block_size, Hkv, D], query's dtype, same strides; MUTATED: token t's
            rotated key and its value go to page slot // block_size, row slot % block_size.
        slot_mapping: int64 [T]; a negative slot (padding) is skipped. Non-negative slots must be distinct.
        is_neox: rotate-half (True, Qwen) or interleaved pairs.

    Returns:
        (query_out [T, Hq, D], key_out [T, Hkv, D]), normalized and rotated, new contiguous tensors.

    Example:
        >>> cache = qwen_fast.reference.compute_cos_sin_cache(64, 4096, 1e6)
        >>> q, k, v = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        >>> kc, vc, w = torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64), torch.ones(64)
        >>> slots = torch.tensor([5, -1, 9])
        >>> q2, k2 = qwen_fast.qk_norm_rope_and_cache(q, k, v, w, w, 1e-6, torch.arange(3), cache, kc, vc, slots)
        >>> torch.equal(kc[0, 5], k2[0]) and torch.equal(vc[0, 9], v[2])
        True
    """
    check_qk_norm_rope_args(
        query, key, value, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, key_cache, value_cache,
        slot_mapping, is_neox,
    )  # fmt: skip
    _check_positions(positions, cos_sin_cache)
    device = query.device
    capacity = key_cache.shape[0] * key_cache.shape[1]
    _check_index_range("slot_mapping", slot_mapping, capacity, f"the caches' {capacity} slots", allow_negative=True)
    return QK_NORM_ROPE_AND_CACHE(
        device, query, key, value, q_norm_weight, k_norm_weight, float(eps), positions, cos_sin_cache, key_cache,
        value_cache, slot_mapping, is_neox,
    )  # fmt: skip
