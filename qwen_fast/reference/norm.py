"""Reference RMSNorm, exactly as transformers' Qwen3 / Qwen3-MoE RMSNorm (also used as q_norm / k_norm).

    y = weight * to_input_dtype( x32 * rsqrt(mean(x32 ** 2, over the last dim) + eps) ),   x32 = x in fp32

The normalization runs in fp32 and is cast back to x's dtype BEFORE the weight is applied, so in a bf16 model the
result is rounded twice (after normalizing, and after the weight product in bf16). The output dtype is the
promotion of weight's and x's dtypes (bf16 for a bf16 model; fp32 if an fp32 weight meets bf16 activations), as in
transformers. Qwen3 applies it per head to q and k over head_dim, before RoPE.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension with Qwen3's casts (see the module docstring).

    Args:
        x: [..., D], any float dtype (e.g. [T, H, head_dim] for q_norm / k_norm).
        weight: [D], the model's dtype.
        eps: added to the mean square before the reciprocal square root (Qwen3: config.rms_norm_eps, 1e-6).

    Returns:
        [..., D] in torch.promote_types(weight.dtype, x.dtype).

    Example:
        >>> rms_norm(torch.randn(3, 4, 128, dtype=torch.bfloat16), torch.ones(128, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
