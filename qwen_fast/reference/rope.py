"""Reference rotary position embedding (RoPE) with YaRN scaling, as Qwen3 / Qwen3-MoE in transformers.

Frequencies. For head_dim D and base theta (Qwen3: rope_theta = 1e6), pair i in [0, D/2) turns at

    inv_freq[i] = 1 / theta ** (2i / D)                                   (fp32)

YaRN (rope_type "yarn", Qwen3-235B: factor 4, original_max_position_embeddings 32768) blends, per pair, the
original frequency (extrapolation) with the frequency divided by `factor` (interpolation). With

    dim(r)  = D * ln(original_max / (2 pi r)) / (2 ln theta)      the pair index that turns r times over original_max
    low     = max(floor(dim(beta_fast)), 0),  high = min(ceil(dim(beta_slow)), D - 1)     (beta_fast 32, beta_slow 1;
              no floor/ceil when truncate=False; high += 0.001 if low == high)
    ramp[i] = clamp((i - low) / (high - low), 0, 1)
    w[i]    = 1 - ramp[i]                                          the weight of extrapolation
    inv_freq[i] = 1 / (factor * theta ** (2i / D)) * (1 - w[i]) + 1 / theta ** (2i / D) * w[i]

fast pairs (i <= low) keep their frequency, slow pairs (i >= high) are interpolated. The cos/sin are also scaled by
the attention factor: `attention_factor` if given, else mscale(factor) / mscale(factor, mscale_all_dim) when the
config has both mscale keys (DeepSeek), else mscale(factor) = 0.1 * ln(factor) + 1 (1.1386 for factor 4; 1 when
factor <= 1). If `factor` is None it is max_position / original_max.

Cache. cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_factor, [max_position, D] (D/2 cos
then D/2 sin), computed in fp32 with p * inv_freq an fp32 product (as transformers) and cast to `dtype` at the end.

Rotation (neox / rotate-half, Qwen's): the halves x1 = x[..., :D/2], x2 = x[..., D/2:] form the pairs (x1[i], x2[i]):

    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin

Interleaved (GPT-J, is_neox=False): the pairs are (x[2i], x[2i + 1]), with the same formula.

Numerics. The rotation is computed in torch.promote_types(x.dtype, cache.dtype) and cast to x's dtype. With the
default fp32 cache that is fp32 math and one rounding (what a fused kernel does). transformers instead casts cos/sin
to the model dtype and rotates in that dtype (three roundings in bf16); a cache built with dtype=<model dtype>
reproduces transformers' arithmetic exactly. The fp32 expressions above are transformers', term by term: near
position 131072 one ulp of inv_freq moves an angle by up to ~0.01 rad, so re-associating them changes the table.
"""

import math

import torch

from .kv_cache import reshape_and_cache
from .norm import rms_norm


def _wavelength_factors(head_dim: int, base: float) -> torch.Tensor:
    """fp32 [D/2]: base ** (2i / D), the reciprocal of the unscaled inverse frequencies, in fp32 as transformers."""
    return base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, base: float, rope_scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """(fp32 [D/2] inverse frequencies, attention factor) of YaRN, see the module docstring."""
    original_max = rope_scaling["original_max_position_embeddings"]
    factor = rope_scaling.get("factor") or max_position / original_max

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(rope_scaling.get("beta_fast") or 32)
    high = correction_dim(rope_scaling.get("beta_slow") or 1)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001

    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = _wavelength_factors(head_dim, base)
    inv_freq_interpolation, inv_freq_extrapolation = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def compute_cos_sin_cache(
    head_dim: int,
    max_position: int,
    base: float = 10000.0,
    rope_scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The table of cos and sin per position (vLLM's `_compute_cos_sin_cache`), see the module docstring.

    Args:
        head_dim: D, even.
        max_position: number of positions in the table (also the target length when YaRN's factor is None).
        base: theta, used unless rope_scaling carries "rope_theta".
        rope_scaling: a transformers config's `rope_parameters` (5.x) or `rope_scaling` (4.x) dict, or None.
            "rope_type" (or legacy "type") "default" or "yarn"; YaRN reads "factor", "original_max_position_embeddings"
            and optionally "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate".
            "rope_theta", when present, overrides `base` (transformers 5 keeps theta there).
        dtype: dtype of the returned table; fp32 (default) for fp32 rotation math, the model dtype for transformers'.

    Returns:
        [max_position, D] in `dtype`: row p is [cos(p * inv_freq) | sin(p * inv_freq)] * attention_factor.

    Example:
        >>> yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
        >>> compute_cos_sin_cache(128, 131072, 1e6, yarn).shape
        torch.Size([131072, 128])
    """
    rope_scaling = rope_scaling or {}
    base = rope_scaling.get("rope_theta", base)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        inv_freq, attention_factor = 1.0 / _wavelength_factors(head_dim, base), 1.0
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(head_dim, base, rope_scaling, max_position)
    else:
        raise ValueError(f"rope_scaling rope_type must be 'default' or 'yarn', got {rope_type!r}")

    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, D/2], fp32
    cos = angles.cos() * attention_factor
    sin = angles.sin() * attention_factor
    return torch.cat((cos, sin), dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the pairs of x [..., H, D] by cos/sin [..., 1, D/2]; the math runs in the promoted dtype."""
    if is_neox:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    out = torch.cat((out1, out2), dim=-1) if is_neox else torch.stack((out1, out2), dim=-1).flatten(-2)
    return out.to(x.dtype)


def apply_rotary_emb(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query and key by their tokens' positions (vLLM's `RotaryEmbedding.forward_native`); new tensors.

    Args:
        positions: int64 [*], e.g. [T] (packed tokens) or [B, S].
        query: [*, Hq, D], any float dtype.
        key: [*, Hkv, D], query's dtype, or None (then None is returned for it).
        cos_sin_cache: [max_position, D] from `compute_cos_sin_cache`; fp32 for fp32 math, the model dtype to
            reproduce transformers' rounding (see the module docstring).
        is_neox: True for rotate-half pairs (Qwen, Llama), False for interleaved pairs (GPT-J).

    Returns:
        (query, key) rotated, in their own dtypes and shapes.

    Example:
        >>> cache = compute_cos_sin_cache(64, 4096, 1e6)
        >>> q, k = torch.randn(5, 8, 64), torch.randn(5, 2, 64)
        >>> q_rot, k_rot = apply_rotary_emb(torch.arange(5), q, k, cache)
        >>> torch.equal(q_rot[0], q[0])  # position 0 is the identity
        True
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # each [*, D/2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return _rotate(query, cos, sin, is_neox), None if key is None else _rotate(key, cos, sin, is_neox)


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
    """vLLM's `rotary_embedding` (vllm/_custom_ops.py): apply_rotary_emb's rotation written back into query and key.

    Args:
        positions: int64 [T] or [B, S] (P = its shape).
        query: [*P, Hq * head_size] or [*P, Hq, head_size]; MUTATED.
        key: like query with Hkv heads, or None; MUTATED.
        head_size: D.
        cos_sin_cache: [max_position, rot_dim]; each head's dims [rope_dim_offset, rope_dim_offset + rot_dim) turn.
        is_neox: rotate-half (True) or interleaved pairs.
        rope_dim_offset: the first rotated dim of each head.
        inverse: rotate by the negative angles (sin negated).

    Example:
        >>> cache = compute_cos_sin_cache(64, 4096, 1e6)
        >>> q, k = torch.randn(5, 8 * 64), torch.randn(5, 2, 64)
        >>> rotary_embedding(torch.arange(5), q, k, 64, cache, True)
        >>> rotary_embedding(torch.arange(5), q, k, 64, cache, True, inverse=True)  # undoes it (up to rounding)
    """
    rot_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # each [*P, rot_dim / 2]
    cos, sin = cos.unsqueeze(-2), (-sin if inverse else sin).unsqueeze(-2)  # broadcast over heads
    for x in (query, key):
        if x is not None:
            heads = x if x.dim() == positions.dim() + 2 else x.unflatten(-1, (-1, head_size))
            part = heads[..., rope_dim_offset : rope_dim_offset + rot_dim]
            part.copy_(_rotate(part, cos, sin, is_neox))


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
    """Qwen3 attention's q/k preparation: per-head RMSNorm of q and k, RoPE, then k and v written into the pages.

    The composition of the references, in order; its roundings are the contract of the fused kernels. For query
    and key in dtype X (weights in X too):
        n = to_X(x32 * rsqrt(mean(x32 ** 2) + eps))    (rms_norm: fp32 math, rounded to X)
        y = to_X(weight * n)                            (the weight product, rounded to X)
        out = rotation of y in promote(X, cache dtype)  (fp32 cache: fp32 math and one rounding to X; a cache in X:
                                                         every product and sum rounded to X, as transformers)

    Args:
        query: [T, Hq, D]; key, value: [T, Hkv, D]; all one float dtype.
        q_norm_weight, k_norm_weight: [D], query's dtype.
        eps: RMSNorm epsilon (Qwen3: 1e-6).
        positions: int64 [T].
        cos_sin_cache: [max_position, D] from compute_cos_sin_cache.
        key_cache, value_cache: [num_blocks, block_size, Hkv, D]; MUTATED at the non-negative slots.
        slot_mapping: int64 [T]; negative slots are skipped.
        is_neox: rotate-half pairs (True, Qwen) or interleaved pairs.

    Returns:
        (query_out [T, Hq, D], key_out [T, Hkv, D]): normalized and rotated, new tensors in query's dtype.

    Example:
        >>> cache = compute_cos_sin_cache(64, 4096, 1e6)
        >>> q, k, v = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        >>> kc, vc = torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64)
        >>> w, slots = torch.ones(64), torch.tensor([5, -1, 9])
        >>> q2, k2 = qk_norm_rope_and_cache(q, k, v, w, w, 1e-6, torch.arange(3), cache, kc, vc, slots)
        >>> torch.equal(kc[0, 5], k2[0]) and torch.equal(vc[0, 9], v[2])
        True
    """
    query = rms_norm(query, q_norm_weight, eps)
    key = rms_norm(key, k_norm_weight, eps)
    query, key = apply_rotary_emb(positions, query, key, cos_sin_cache, is_neox)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    return query, key
