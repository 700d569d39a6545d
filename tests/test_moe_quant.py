"""Quantized experts (fp8 block-scaled, int8 per channel): the formats (qwen_fast.reference.quant), the reference
against transformers' own FP8 path, every backend against the reference, the modules and the integration
(MoEExperts.quantize, quantize_experts, FP8Experts through from_hf, patch and the registered FP8 experts
implementation), and the errors.

transformers 5.24 has no CPU kernel for FP8Experts (its forward needs the hub's finegrained-fp8 Triton kernel); on a
machine without a GPU it dequantizes an FP8 checkpoint at load (Fp8Dequantize: fp32 product, one rounding to the
model dtype) and runs the float experts. That is the reference's definition, tested here with transformers' own
dequantization and experts. Tiny FP8 models are made by quantizing a random model's experts into FP8Experts modules
(no downloads).
"""

import functools

import pytest
import torch
from backends import backend_params
from numerics import assert_close, assert_within_budget
from tiny_models import MOE_FAMILIES, tiny_model
from transformers import Qwen3MoeConfig
from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, Fp8Dequantize, FP8Experts
from transformers.integrations.moe import use_experts_implementation
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import qwen_fast
from qwen_fast.nn import MoEExperts
from qwen_fast.reference.moe import experts as reference_experts
from qwen_fast.reference.quant import FP8, dequantize, quantize_fp8, quantize_int8, scale_shape

NAME = qwen_fast.register_transformers()
H, I = 40, 24  # noqa: E741  hidden, intermediate: not multiples of the 16-blocks below (partial blocks in both dimensions)
BLOCK = [16, 16]


def _weights(num_experts: int, hidden: int = H, inter: int = I) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded fp32 w13 [E, 2I, H], w2 [E, H, I] with N(0, 1/fan_in) entries."""
    return torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5, torch.randn(
        num_experts, hidden, inter
    ) / inter**0.5


def _quantized(fmt: str, w13: torch.Tensor, w2: torch.Tensor, block=BLOCK) -> tuple[list, dict]:
    """([w13_q, w2_q], fused_experts' quantization keywords) for format `fmt`."""
    if fmt == "fp8":
        (q13, s13), (q2, s2) = quantize_fp8(w13, block), quantize_fp8(w2, block)
        return [q13, q2], {"use_fp8_w8a8": True, "w1_scale": s13, "w2_scale": s2, "block_shape": block}
    (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
    return [q13, q2], {"use_int8_w8a16": True, "w1_scale": s13, "w2_scale": s2}


def _scale_args(quant: dict) -> tuple:
    return quant["w1_scale"], quant["w2_scale"], quant.get("block_shape")


# --- the formats ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(16, 16), (128, 128), (7, 5), (1, 24)])
def test_fp8_round_trip_and_scales(block):
    w = torch.randn(3, 2 * I, H) * torch.logspace(-3, 2, H)  # columns over five decades: blocks with own scales
    w[1, :16, :16] = 0  # an all-zero block
    q, scale = quantize_fp8(w, block)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.is_contiguous()
    assert tuple(scale.shape) == scale_shape(w.shape, FP8, block)
    back = dequantize(q, scale, block)
    # e4m3 keeps 3 mantissa bits: |W - W'| <= 2^-4 |W| (nearest rounding) within each block's normal range
    expanded = scale.repeat_interleave(block[0], 1)[:, : w.shape[1]].repeat_interleave(block[1], 2)[..., :H]
    assert ((back - w).abs() <= w.abs() / 16 + expanded * 2**-9).all()
    assert (q.float().abs().amax() == 448) and torch.equal(back[1, :16, :16], w[1, :16, :16])


def test_int8_round_trip_and_scales():
    w = torch.randn(3, 2 * I, H) * torch.logspace(-3, 2, 2 * I)[:, None]  # rows over five decades
    w[2, 5] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and tuple(scale.shape) == (3, 2 * I) and scale.dtype == torch.float32
    assert q.min() >= -127 and (q.abs().amax(-1)[w.abs().amax(-1) > 0] == 127).all()
    assert ((dequantize(q, scale) - w).abs() <= scale[..., None] * (0.5 + 1e-4)).all()  # round to nearest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_transformers_fp8_checkpoint_path(dtype):
    """transformers' CPU path for an FP8 checkpoint (its Fp8Dequantize at load, then its float experts) on the same
    fp8 weights and scales: the reference dequantizes to the same bits and computes the same experts."""
    torch.manual_seed(0)
    hidden, inter, experts = 64, 32, 8  # whole 16-blocks: Fp8Dequantize infers the block from the grids
    w13, w2 = _weights(experts, hidden, inter)
    (q13, w1_scale), (q2, w2_scale) = quantize_fp8(w13, BLOCK), quantize_fp8(w2, BLOCK)
    hf_w13 = Fp8Dequantize(None)._dequantize_one(q13, w1_scale, output_dtype=dtype)
    hf_w2 = Fp8Dequantize(None)._dequantize_one(q2, w2_scale, output_dtype=dtype)
    assert torch.equal(dequantize(q13, w1_scale, BLOCK).to(dtype), hf_w13)
    assert torch.equal(dequantize(q2, w2_scale, BLOCK).to(dtype), hf_w2)

    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts)
    config._experts_implementation = "eager"
    hf = Qwen3MoeExperts(config).to(dtype)
    with torch.no_grad():
        hf.gate_up_proj.copy_(hf_w13)
        hf.down_proj.copy_(hf_w2)
        x = torch.randn(24, hidden, dtype=dtype)
        weights, ids = qwen_fast.reference.topk_routing(torch.randn(24, experts), 4)
        expected = hf(x, ids.long(), weights.to(dtype))
    out = reference_experts(x, q13, q2, weights.to(dtype), ids, None, "silu", w1_scale, w2_scale, BLOCK)
    assert_close(out, expected)


# --- every backend against the reference ------------------------------------------------------------------------


def _backend_dtypes() -> list:
    """(backend, device, dtype) for every backend of fused_experts, in every dtype its tensors' device takes (Triton's
    interpreter: not bf16, see qwen_fast.ops._dispatch)."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    return [
        pytest.param(*p.values, dtype, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}")
        for p in backend_params("fused_experts")
        for dtype in dtypes
        if not (p.values == ("triton", "cpu") and dtype == torch.bfloat16)
    ]


def _w8a8_reference(backend, args, quant, x, weights_q, topk_weights, ids):
    """The w8a8 reference where the triton backend runs fp8 experts as w8a8 (sm_90, 16-bit activations:
    kernels/moe_gemm_quant.py uses_w8a8), else None."""
    if backend != "triton" or not args[1].is_cuda:
        return None
    from qwen_fast.kernels import moe_gemm, moe_gemm_quant
    from qwen_fast.reference.moe_w8a8 import experts_w8a8

    config = moe_gemm.choose_config(*ids.shape, args[1])
    if not moe_gemm_quant.uses_w8a8(args[0], args[1], quant.get("block_shape"), config):
        return None
    return experts_w8a8(x, *weights_q, topk_weights, ids, *_scale_args(quant))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
@pytest.mark.parametrize("backend,device,dtype", _backend_dtypes())
def test_backends_match_reference(backend, device, dtype, num_tokens, fmt):
    torch.manual_seed(num_tokens)
    w13, w2 = _weights(8)
    weights_q, quant = _quantized(fmt, w13, w2)
    x = torch.randn(num_tokens, H).to(dtype)
    topk_weights, ids = qwen_fast.reference.topk_routing(torch.randn(num_tokens, 8), 3)
    args = [t.to(device) for t in (x, *weights_q, topk_weights, ids)]
    quant_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in quant.items()}
    with qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
        out = qwen_fast.fused_experts(*args, **quant_dev)
    assert ("fused_experts", backend) in trace and {b for _, b in trace} == {backend}
    expected = reference_experts(x, *weights_q, topk_weights, ids, None, "silu", *_scale_args(quant))
    w8a8 = _w8a8_reference(backend, args, quant, x, weights_q, topk_weights, ids)
    assert_close(out.cpu(), expected if w8a8 is None else w8a8)
    # and the reference is the float experts on the dequantized weights (rounded to the activation dtype)
    block = quant.get("block_shape")
    deq = [dequantize(w, s, block).to(dtype) for w, s in zip(weights_q, _scale_args(quant)[:2], strict=True)]
    assert torch.equal(expected, reference_experts(x, *deq, topk_weights, ids))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("seed", range(4))
def test_cpu_bf16_many_routes_within_budget(fmt, seed):
    """The cpu kernel dequantizes in fp32 and never rounds W to bf16, as the reference does (transformers' load-time
    dequantization): with k = 8 of 61 experts on 64 tokens the two round in different places by more than the
    bf16 table allows. Both are then held to the fp32 truth (the reference on fp32 activations and the fp32
    dequantized weights) by flash-attn's budget: the kernel within twice the reference's own bf16 error."""
    torch.manual_seed(seed)
    w13, w2 = _weights(61)
    weights_q, quant = _quantized(fmt, w13, w2)
    x = torch.randn(64, H)
    topk_weights, ids = qwen_fast.reference.topk_routing(torch.randn(64, 61), 8)
    with qwen_fast.record_backends() as trace, qwen_fast.use_backend("cpu"):
        out = qwen_fast.fused_experts(x.bfloat16(), *weights_q, topk_weights, ids, **quant)
    assert trace == [("fused_experts", "cpu")]
    scales = _scale_args(quant)
    truth = reference_experts(x, *weights_q, topk_weights, ids, None, "silu", *scales)
    assert truth.dtype == torch.float32
    reference_bf16 = reference_experts(x.bfloat16(), *weights_q, topk_weights, ids, None, "silu", *scales)
    assert_within_budget(out, truth, reference_bf16)


@pytest.mark.parametrize("backend,device", backend_params("fused_experts", kernels_only=True))
def test_opcheck_fp8(backend, device):
    """torch.library.opcheck of the registered op with fp8 weights (the op harness opchecks the int8 sample): fake,
    autograd registration and AOT dispatch; its schema check compares tensors with allclose, which has no fp8 kernel
    (torch 2.14), and the schema is the same for every dtype."""
    (q13, q2), quant = _quantized("fp8", *_weights(8))
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(5, 8), 2)
    args = [t.to(device) for t in (torch.randn(5, H), q13, q2, weights, ids, quant["w1_scale"], quant["w2_scale"])]
    op = {"cpu": torch.ops.qwen_fast, "triton": torch.ops.qwen_fast_triton}[backend].fused_experts.default
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (*args[:5], None, "silu", *args[5:], BLOCK), test_utils=utils)


def test_fused_moe_takes_quantized_experts():
    w13, w2 = _weights(8)
    weights_q, quant = _quantized("fp8", w13, w2)
    x, logits = torch.randn(5, H), torch.randn(5, 8)
    topk_weights, ids = qwen_fast.reference.topk_routing(logits, 2, True)
    expected = qwen_fast.reference.fused_experts(x, *weights_q, topk_weights, ids, **quant)
    assert_close(qwen_fast.fused_moe(x, *weights_q, logits, 2, True, **quant), expected)
    assert_close(qwen_fast.reference.fused_moe(x, *weights_q, logits, 2, True, **quant), expected)


# --- modules and integration ------------------------------------------------------------------------------------


@functools.cache
def _fp8_experts_class() -> type:
    """transformers' FP8Experts as its quantizer prepares it (dispatching on config._experts_implementation)."""
    return use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)


def _to_fp8_experts(model: torch.nn.Module, block=BLOCK) -> torch.nn.Module:
    """Replace every layer's float experts with transformers' FP8Experts holding their fp8 quantization, in place:
    a tiny FP8 checkpoint as transformers loads one on a GPU machine."""
    for layer in model.model.layers:
        old = layer.mlp.experts
        new = _fp8_experts_class()(model.config, block_size=tuple(block))
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                q, scale = quantize_fp8(getattr(old, name).detach(), block)
                getattr(new, name).copy_(q)
                target = getattr(new, f"{name}_scale_inv")
                target.zero_()[:, : scale.shape[1]] = scale  # transformers allocates 2 rows for 2I in one block
        layer.mlp.experts = new
    return model


def _dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The float model transformers makes of an FP8 checkpoint on CPU (Fp8Dequantize of every expert)."""
    float_model = tiny_model("qwen3_moe", dtype=model.dtype)  # seeded: the same weights outside the experts
    for layer, fp8_layer in zip(float_model.model.layers, model.model.layers, strict=True):
        fp8 = fp8_layer.mlp.experts
        block = list(fp8.block_size)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                w, scale = getattr(fp8, name), getattr(fp8, f"{name}_scale_inv")
                scale = scale[:, : scale_shape(w.shape, FP8, block)[1]]
                getattr(layer.mlp.experts, name).copy_(dequantize(w, scale, block).to(model.dtype))
    float_model.config._experts_implementation = "eager"
    return float_model


def test_registered_fp8_experts_run_qwen_fast():
    """An FP8 model with experts_implementation="qwen_fast": FP8Experts run by fused_experts' fp8 path, on CPU where
    transformers has no kernel; logits as transformers' dequantized model's."""
    model = _to_fp8_experts(tiny_model("qwen3_moe"), block=[128, 128])  # 2I = 32 < 128: the 2-row scale grid
    model.set_experts_implementation(NAME)
    prompt = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23]])
    with torch.no_grad(), qwen_fast.record_backends() as trace:
        logits = model(prompt).logits
    assert ("fused_experts", "cpu") in trace
    with torch.no_grad():
        assert_close(logits, _dequantized_copy(model)(prompt).logits)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_moe_experts_quantize_and_from_hf(fmt):
    torch.manual_seed(0)
    experts = MoEExperts(8, H, I)
    w13, w2 = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    assert experts.quantize(fmt, block_shape=(16, 16)) is experts
    weights_q, quant = _quantized(fmt, w13, w2, [16, 16])
    assert torch.equal(experts.gate_up_proj.view(torch.uint8), weights_q[0].view(torch.uint8))
    assert torch.equal(experts.down_proj_scale_inv, quant["w2_scale"])
    assert "quantization" in repr(experts) and not experts.gate_up_proj.requires_grad
    x, (weights, ids) = torch.randn(6, H), qwen_fast.reference.topk_routing(torch.randn(6, 8), 2)
    expected = qwen_fast.reference.fused_experts(x, *weights_q, weights, ids, **quant)
    with torch.no_grad():
        assert_close(experts(x, ids, weights), expected)
        assert_close(experts.run(x, ids, weights), expected)
    with pytest.raises(ValueError, match=f"already quantized \\({fmt}\\)"):
        experts.quantize("int8")


def test_moe_experts_from_fp8_experts_shares():
    model = _to_fp8_experts(tiny_model("qwen3_moe"))
    hf = model.model.layers[0].mlp.experts
    experts = MoEExperts.from_hf(hf)
    assert experts.gate_up_proj is hf.gate_up_proj and experts.down_proj_scale_inv is hf.down_proj_scale_inv
    assert (experts.quantization, experts.block_size) == ("fp8", tuple(BLOCK))
    hf.activation_scheme = "static"
    with pytest.raises(ValueError, match="has activation_scheme = 'static'"):
        MoEExperts.from_hf(hf)


@pytest.mark.parametrize("source", ["fp8-checkpoint", "quantize_experts-fp8", "quantize_experts-int8"])
def test_quantized_model_patch_and_backends(source):
    """A quantized tiny Qwen3-MoE: patch swaps its (FP8 or quantized) experts in, undo restores them; greedy tokens
    are the same on every CPU backend route (auto: cpu kernels, and the torch reference)."""
    model = tiny_model("qwen3_moe")
    if source == "fp8-checkpoint":
        _to_fp8_experts(model)
        reference = _dequantized_copy(model)
    else:
        fmt = source.rpartition("-")[2]
        assert qwen_fast.quantize_experts(model, fmt, block_shape=(16, 16)) == 2
        assert all(isinstance(layer.mlp.experts, MoEExperts) for layer in model.model.layers)
        reference = None
    prompt = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23]])
    originals = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        before = model(prompt).logits if reference is None else reference(prompt).logits
    tokens = {}
    with qwen_fast.patch(model) as handle:
        assert any("SparseMoeBlock" in line for line in handle.patched)
        formats = {layer.mlp.experts.quantization for layer in model.model.layers}
        assert formats == {"fp8" if "fp8" in source else "int8"}
        with torch.no_grad():
            assert_close(model(prompt).logits, before)
        for backend in ("auto", "torch"):
            with qwen_fast.use_backend(backend), qwen_fast.record_backends() as trace:
                tokens[backend] = model.generate(prompt, max_new_tokens=8, do_sample=False)
            assert ("fused_experts", "cpu" if backend == "auto" else "torch") in trace
    assert torch.equal(tokens["auto"], tokens["torch"])
    assert [layer.mlp for layer in model.model.layers] == originals


@pytest.mark.interpret
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_model_triton_tokens(fmt):
    """Greedy tokens of a patched quantized tiny model on the triton backend (the interpreter, fp32) equal the
    torch reference's."""
    model = tiny_model("qwen3_moe")
    qwen_fast.quantize_experts(model, fmt, block_shape=(16, 16))
    prompt = torch.tensor([[5, 17, 3, 88, 41, 9]])
    tokens = {}
    with qwen_fast.patch(model):
        for backend in ("triton", "torch"):
            with qwen_fast.use_backend(backend), qwen_fast.record_backends() as trace:
                tokens[backend] = model.generate(prompt, max_new_tokens=4, do_sample=False)
            assert ("fused_experts", backend) in trace
    assert torch.equal(tokens["triton"], tokens["torch"])


def _dequantized_experts(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """The float tiny `family` model (seeded: the same weights outside the experts) with each experts module holding
    the dequantized values of `model`'s quantized MoEExperts."""
    float_model = tiny_model(family)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MoEExperts):
                for weight in ("gate_up_proj", "down_proj"):
                    w, scale = getattr(module, weight), getattr(module, f"{weight}_scale_inv")
                    getattr(float_model.get_submodule(name), weight).copy_(dequantize(w, scale, module.block_size))
    return float_model


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantize_experts_every_family(family, fmt):
    """quantize_experts on each MoE family's tiny model: the model's own blocks run the quantized MoEExperts, whose
    logits are the float model's on the dequantized weights."""
    model = tiny_model(family)
    layers = model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    assert qwen_fast.quantize_experts(model, fmt, block_shape=(16, 16)) == layers
    prompt = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23]])
    with torch.no_grad(), qwen_fast.record_backends() as trace:
        logits = model(prompt).logits
    assert ("fused_experts", "cpu") in trace
    with torch.no_grad():
        assert_close(logits, _dequantized_experts(model, family)(prompt).logits)


def test_quantize_experts_refuses():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="format must be one of 'fp8', 'int8', got 'int4'"):
        qwen_fast.quantize_experts(model, "int4")
    with pytest.raises(ValueError, match=r"block_shape must be two ints \(bn, bk\) >= 1, got \(0, 128\)"):
        qwen_fast.quantize_experts(model, "fp8", block_shape=(0, 128))
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # nothing changed
    with qwen_fast.patch(model), pytest.raises(ValueError, match="quantize_experts before patch"):
        qwen_fast.quantize_experts(model, "fp8")
    qwen_fast.quantize_experts(model, "int8")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts \(MoEExperts\) is already quantized"):
        qwen_fast.quantize_experts(model, "fp8")
    with pytest.raises(ValueError, match="found no experts module in Linear"):
        qwen_fast.quantize_experts(torch.nn.Linear(2, 2), "fp8")


# --- errors -----------------------------------------------------------------------------------------------------


def _fp8_args() -> dict:
    (q13, q2), quant = _quantized("fp8", *_weights(4))
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(3, 4), 2)
    return {"hidden_states": torch.randn(3, H), "w1": q13, "w2": q2, "topk_weights": weights, "topk_ids": ids} | quant


def _int8(a: dict) -> dict:
    (q13, q2), quant = _quantized("int8", *_weights(4))
    return {"w1": q13, "w2": q2, "use_fp8_w8a8": False, "block_shape": None} | quant


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: {"use_fp8_w8a8": False, "w1_scale": None, "w2_scale": None, "block_shape": None}, ValueError,
         "w1 is torch.float8_e4m3fn: quantized weights need use_fp8_w8a8=True"),
        (lambda a: {"w1_scale": None}, ValueError, r"use_fp8_w8a8=True needs w1_scale \(the weights' fp32 scales\)"),
        (lambda a: {"block_shape": None}, ValueError, "use_fp8_w8a8=True needs block_shape"),
        (lambda a: {"use_fp8_w8a8": 1}, TypeError, "use_fp8_w8a8 must be a bool, got int 1"),
        (lambda a: {"use_int8_w8a16": True}, ValueError, "use_fp8_w8a8=True and use_int8_w8a16=True: pick one"),
        (lambda a: {"w2": _int8(a)["w2"]}, TypeError, "needs w1 and w2 in torch.float8_e4m3fn, got w2 in torch.int8"),
        (lambda a: {"w1": a["w1"].float()}, TypeError, "in torch.float8_e4m3fn, got w1 in torch.float32"),
        (lambda a: {"w1_scale": a["w1_scale"][:, :2]}, ValueError,
         r"w1_scale must be \[E, ceil\(2I/bn\), ceil\(H/bk\)\] = \(4, 3, 3\), got \(4, 2, 3\)"),
        (lambda a: {"w2_scale": a["w2_scale"].half()}, TypeError, "w2_scale must be float32, got torch.float16"),
        (lambda a: {"w2_scale": a["w2_scale"].to("meta")}, ValueError, "w2_scale must be on cpu"),
        (lambda a: {"block_shape": [16]}, ValueError, r"block_shape must be \[bn, bk\] with bn, bk >= 1, got \[16\]"),
        (lambda a: {"block_shape": [16, 0]}, ValueError, r"block_shape must be \[bn, bk\] with bn, bk >= 1"),
        (lambda a: {"block_shape": [16.0, 16]}, TypeError, r"block_shape must be a list of two ints \[bn, bk\]"),
        (lambda a: {"block_shape": [8, 8]}, ValueError, r"w1_scale must be \[E, ceil\(2I/bn\), .* = \(4, 6, 5\)"),
        (lambda a: {"a1_scale": torch.ones(1)}, ValueError, "a1_scale was given, which is not supported"),
        (lambda a: {"per_channel_quant": True}, ValueError, "per_channel_quant=True is not supported"),
        (lambda a: _int8(a) | {"w1_scale": _int8(a)["w1_scale"][:, :4]}, ValueError,
         r"w1_scale must be \[E, 2I\] = \(4, 48\), got \(4, 4\)"),
        (lambda a: _int8(a) | {"block_shape": [1, 128]}, ValueError, "use_int8_w8a16=True takes per-channel scales"),
        (lambda a: _int8(a) | {"use_int8_w8a16": False}, ValueError, "w1 is torch.int8: quantized weights need"),
        (lambda a: {"w1": a["w1"].float(), "w2": a["w2"].float(), "use_fp8_w8a8": False, "block_shape": None},
         ValueError, "w1_scale was given for unquantized weights: pass use_fp8_w8a8=True or use_int8_w8a16=True"),
    ],
)  # fmt: skip
def test_quantized_bad_input(change, error, message):
    args = _fp8_args()
    with pytest.raises(error, match=message):
        qwen_fast.fused_experts(**(args | change(args)))


def test_op_checks_the_scales():
    """The op's own contract (its fake shares it): the scales must say the weights' format."""
    args = _fp8_args()
    op_args = [args[n] for n in ("hidden_states", "w1", "w2", "topk_weights", "topk_ids")]
    with pytest.raises(RuntimeError, match=r"w2_scale is required for torch.float8_e4m3fn weights"):
        with torch._subclasses.FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in op_args]
            torch.ops.qwen_fast_triton.fused_experts(*fake, None, "silu", mode.from_tensor(args["w1_scale"]), None,
                                                     BLOCK)  # fmt: skip
