"""Reference of the Triton w8a8 fp8 experts (kernels/moe_gemm_quant.py): fp8 block-scaled weights times activations
quantized to fp8 per token and per group of bk columns, DeepGEMM's and vLLM's scheme for FP8 checkpoints.

For each GEMM out = a @ W.T with weights w float8_e4m3fn [N, K] and scales s fp32 [ceil(N/bn), ceil(K/bk)]:

    a_scale[r, g] = max(max_{k in group g} |a[r, k]|, 1e-10) / 448                 fp32, group g = k // bk
    a_q[r, k]     = e4m3(clamp(a[r, k] / a_scale[r, g], -448, 448))                round to nearest even
    out[r, n]     = sum_g (sum_{k in g} a_q[r, k] * w[n, k]) * a_scale[r, g] * s[n // bn, g]      fp32, g ascending

The experts then run as the reference's (qwen_fast/reference/moe.py): gate and up rounded to the activation dtype,
act(gate) and act * up rounded to it, the intermediate quantized again for the down GEMM, y rounded to the
activation dtype, and the fp32 combine over j ascending. Only the activation rounding differs from the w8a16 path,
whose reference is the dequantized weights through qwen_fast.reference.moe.experts.
"""

import torch

from qwen_fast.reference.moe import ACTIVATIONS, local_ids
from qwen_fast.reference.quant import FP8_MAX


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (codes float8_e4m3fn [R, K], scales fp32 [R, ceil(K/group)]) as the module docstring states.

    Example:
        >>> codes, scales = quantize_groups(torch.tensor([[1.0, -2.0, 0.5, 4.0]]), 2)
        >>> (codes.float() * scales.repeat_interleave(2, 1)).tolist()
        [[1.0, -2.0, 0.5, 4.0]]
    """
    rows, width = x.shape
    num_groups = -(-width // group)
    padded = torch.zeros(rows, num_groups * group, dtype=torch.float32, device=x.device)
    padded[:, :width] = x.float()
    groups = padded.view(rows, num_groups, group)
    scales = groups.abs().amax(dim=2).clamp(min=1e-10) / FP8_MAX
    codes = (groups / scales[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(rows, -1)[:, :width], scales


def block_matmul(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block_shape: list[int]) -> torch.Tensor:
    """a [R, K] (any float dtype) @ W.T for fp8 block-scaled w [N, K], w_scale [ceil(N/bn), ceil(K/bk)]: fp32 [R, N],
    a quantized per row and group of bk columns."""
    bn, bk = block_shape
    codes, a_scale = quantize_groups(a, bk)
    col_scale = w_scale.repeat_interleave(bn, dim=0)[: w.shape[0]]  # [N, ceil(K/bk)]
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=a.device)
    for g in range(a_scale.shape[1]):
        ks = slice(g * bk, (g + 1) * bk)
        partial = codes[:, ks].float() @ w[:, ks].float().T
        out += partial * a_scale[:, g, None] * col_scale[None, :, g]
    return out


def experts_w8a8(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    block_shape: list[int],
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """fused_experts' experts with fp8 block-scaled weights, activations quantized to fp8 (module docstring).

    Args:
        hidden_states: [T, H] float16 or bfloat16 (fp32 works too: the math is the same).
        w13: [E, 2I, H] float8_e4m3fn; w13_scale [E, ceil(2I/bn), ceil(H/bk)] fp32.
        w2: [E, H, I] float8_e4m3fn; w2_scale [E, ceil(H/bn), ceil(I/bk)] fp32.
        topk_weights: [T, k], used in fp32. topk_ids: [T, k] int32/int64 (global ids with expert_map).
        block_shape: [bn, bk]. expert_map: [global_E] int32 or None. activation: "silu" or "gelu".

    Returns:
        [T, H] in hidden_states' dtype.

    Example:
        >>> x, w13, w2 = torch.randn(2, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
        >>> f8 = torch.float8_e4m3fn
        >>> out = experts_w8a8(x, w13.to(f8), w2.to(f8), torch.ones(2, 1), torch.tensor([[0], [1]]),
        ...                    torch.ones(2, 1, 1), torch.ones(2, 1, 1), [8, 8])
        >>> out.shape
        torch.Size([2, 8])
    """
    num_tokens, topk = topk_ids.shape
    dtype, inter = hidden_states.dtype, w2.shape[2]
    flat_ids = local_ids(topk_ids, expert_map).flatten().long()
    y = torch.zeros(num_tokens * topk, w2.shape[1], dtype=dtype, device=hidden_states.device)
    for expert in range(w13.shape[0]):
        pairs = (flat_ids == expert).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        gate_up = block_matmul(hidden_states[pairs // topk], w13[expert], w13_scale[expert], block_shape).to(dtype)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        act = ACTIVATIONS[activation](gate.float()).to(dtype)
        act = (act.float() * up.float()).to(dtype)
        y[pairs] = block_matmul(act, w2[expert], w2_scale[expert], block_shape).to(dtype)
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    for j in range(topk):
        out += topk_weights[:, j, None].float() * y.view(num_tokens, topk, -1)[:, j].float()
    return out.to(hidden_states.dtype)
