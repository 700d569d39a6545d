"""The Triton grouped GEMM with quantized experts (kernels/moe_gemm_quant.py), called through its launcher
(kernels/moe_gemm.fused_experts) on the routing layout of qwen_fast.moe_align_block_size.

w8a16 (fp8 block-scaled, int8 per channel) against the reference (qwen_fast.reference.moe.experts with the scales:
the weights dequantized, rounded to the activation dtype); w8a8 against its own reference
(qwen_fast/reference/moe_w8a8.py), forced under the interpreter and as auto-selected on a GPU. Shapes are tiny: the
interpreter runs each program serially.
"""

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast.reference.moe import experts
from qwen_fast.reference.moe_w8a8 import block_matmul, experts_w8a8
from qwen_fast.reference.moe_w8a8 import quantize_groups as reference_quantize_groups
from qwen_fast.reference.quant import dequantize, quantize_fp8, quantize_int8
from qwen_fast.reference.routing import topk_routing

kernels = pytest.importorskip("qwen_fast.kernels.moe_gemm")
quant = pytest.importorskip("qwen_fast.kernels.moe_gemm_quant")

HIDDEN, INTER, EXPERTS, TOPK = 96, 40, 4, 2  # H, I not multiples of the blocks below: partial last blocks


def make_experts(fmt: str, block_shape, device="cpu"):
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER) / INTER**0.5
    if fmt == "fp8":
        (q13, s13), (q2, s2) = quantize_fp8(w13, block_shape), quantize_fp8(w2, block_shape)
    else:
        (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
    return [t.to(device) for t in (q13, q2, s13, s2)]


def launch(x, q13, q2, weights, ids, s13, s2, block_shape, activation="silu", expert_map=None, config=None, **kw):
    """The launcher as ops/moe.py composes it: choose_config, moe_align_block_size, expert_map on the blocks."""
    config = kernels.choose_config(ids.shape[0], ids.shape[1], q13) if config is None else config
    num_experts = q13.shape[0] if expert_map is None else expert_map.shape[0]
    sorted_ids, expert_ids, post_padded = qwen_fast.moe_align_block_size(ids, config["BLOCK_M"], num_experts)
    if expert_map is not None:
        expert_ids = expert_map[expert_ids.long()].to(torch.int32)
    args = (sorted_ids, expert_ids, post_padded, config, expert_map is not None, activation, s13, s2, block_shape)
    return kernels.fused_experts(x, q13, q2, weights, *args, **kw)


@pytest.mark.parametrize("block_shape", [[128, 128], [64, 64], [32, 32], [16, 48], [7, 5]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.interpret
def test_fp8_w8a16_matches_the_dequantized_reference(dtype, block_shape):
    """Scales per tile (bk a multiple of BLOCK_K 64: one partial block, or two along H) and gathered per element (the
    others, at BLOCK_K 16)."""
    q13, q2, s13, s2 = make_experts("fp8", block_shape)
    x = torch.randn(5, HIDDEN).to(dtype)
    weights, ids = topk_routing(torch.randn(5, EXPERTS), TOPK)
    out = launch(x, q13, q2, weights, ids, s13, s2, block_shape)
    assert_close(out, experts(x, q13, q2, weights, ids, None, "silu", s13, s2, block_shape))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.interpret
def test_int8_w8a16_matches_the_dequantized_reference(dtype, activation):
    q13, q2, s13, s2 = make_experts("int8", None)
    x = torch.randn(6, HIDDEN).to(dtype)
    weights, ids = topk_routing(torch.randn(6, EXPERTS), TOPK)
    out = launch(x, q13, q2, weights, ids, s13, s2, None, activation)
    assert_close(out, experts(x, q13, q2, weights, ids, None, activation, s13, s2))


@pytest.mark.interpret
def test_fp8_with_an_expert_map_and_many_blocks_per_expert():
    """BLOCK_M 16 with 40 pairs over the 3 local experts of 6 global ones: several blocks per expert, skipped blocks
    of another rank's experts (their pairs contribute 0)."""
    block_shape = [32, 32]
    q13, q2, s13, s2 = make_experts("fp8", block_shape)
    q13, q2, s13, s2 = q13[:3], q2[:3], s13[:3], s2[:3]
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    x = torch.randn(20, HIDDEN).half()
    weights, ids = topk_routing(torch.randn(20, 6), TOPK)
    out = launch(x, q13, q2, weights, ids, s13, s2, block_shape, expert_map=expert_map)
    assert_close(out, experts(x, q13, q2, weights, ids, expert_map, "silu", s13, s2, block_shape))


@pytest.mark.parametrize("group", [32, 64, 100])
@pytest.mark.interpret
def test_quantize_groups_matches_its_reference(group):
    """The activation quantizer of w8a8: the same e4m3 codes bit for bit and the same scales. Some rows hold an amax of
    112 per group (scale 1/4, exact) and values halfway between 1.875 * 2^j and 2^(j+1) after scaling, where rounding
    to even carries into the exponent (a plain cast drops that carry under the interpreter)."""
    x = torch.randn(5, 200) * 4
    halfway = 2.0 ** torch.randint(-6, 6, (3, 200)).float() * 1.9375 * 0.25 * torch.randn(3, 200).sign()
    halfway[:, ::group] = 112.0
    x[:3] = halfway
    x = x.half()
    codes, scales = quant.quantize_groups(x, group)
    expected_codes, expected_scales = reference_quantize_groups(x, group)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert torch.equal(scales, expected_scales)


@pytest.mark.parametrize("block_shape,block_k", [([32, 64], 64), ([64, 128], 32)], ids=str)
@pytest.mark.interpret
def test_w8a8_kernels_match_their_reference(block_shape, block_k):
    """The w8a8 kernels forced on CPU tensors (auto picks them on sm_90 only): a K tile of BLOCK_K inside one group
    of bk (bk = BLOCK_K, and bk = 4 BLOCK_K), several groups along H and I."""
    q13, q2, s13, s2 = make_experts("fp8", block_shape)
    x = torch.randn(5, HIDDEN).half()
    weights, ids = topk_routing(torch.randn(5, EXPERTS), TOPK)
    config = kernels.choose_config(5, TOPK, q13)
    config = {**config, **{gemm: {**config[gemm], "BLOCK_K": block_k} for gemm in ("gate_up", "down")}}
    out = launch(x, q13, q2, weights, ids, s13, s2, block_shape, config=config, w8a8=True)
    assert_close(out, experts_w8a8(x, q13, q2, weights, ids, s13, s2, block_shape))


def test_w8a8_reference_is_exact_on_representable_activations():
    """When every group of the activations is exactly e4m3 codes times a power of two with an amax of 448 times it,
    quantizing them loses nothing, and block_matmul equals the matmul of the dequantized weights (fp32)."""
    block_shape = [16, 32]
    codes = torch.randint(0, 256, (6, 96), dtype=torch.uint8).view(torch.float8_e4m3fn).float().nan_to_num(0.0)
    codes[:, ::32] = 448.0
    a = codes * 2.0 ** torch.randint(-4, 4, (6, 3)).float().repeat_interleave(32, 1)
    w, scales = quantize_fp8(torch.randn(1, 40, 96), block_shape)
    expected = a @ dequantize(w, scales, block_shape)[0].T
    assert_close(block_matmul(a, w[0], scales[0], block_shape), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w8a8_is_not_chosen_off_sm90(dtype):
    """CPU tensors, int8 weights and fp32 activations never run w8a8 (the launcher then runs w8a16)."""
    q13, *_ = make_experts("fp8", [128, 128])
    config = kernels.choose_config(1, TOPK, q13)
    assert not quant.uses_w8a8(torch.randn(1, HIDDEN).to(dtype), q13, [128, 128], config)
    q13, *_ = make_experts("int8", None)
    assert not quant.uses_w8a8(torch.randn(1, HIDDEN).half(), q13, None, config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_experts_on_the_gpu(fmt):
    """bf16 on the GPU at the checkpoints' block [128, 128]: w8a8 where uses_w8a8 picks it (sm_90) against its
    reference, else w8a16 against the dequantized reference."""
    block_shape = [128, 128] if fmt == "fp8" else None
    q13, q2, s13, s2 = make_experts(fmt, block_shape, "cuda")
    x = torch.randn(33, HIDDEN, device="cuda").bfloat16()
    weights, ids = topk_routing(torch.randn(33, EXPERTS, device="cuda"), TOPK)
    out = launch(x, q13, q2, weights, ids, s13, s2, block_shape)
    if quant.uses_w8a8(x, q13, block_shape, kernels.choose_config(33, TOPK, q13)):
        expected = experts_w8a8(x, q13, q2, weights, ids, s13, s2, block_shape)
    else:
        expected = experts(x, q13, q2, weights, ids, None, "silu", s13, s2, block_shape)
    assert_close(out, expected)
