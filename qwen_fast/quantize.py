"""qwen_fast.quantize_experts: quantize a loaded model's routed experts to fp8 (block-scaled) or int8 (per channel)
in place, for users without an FP8 checkpoint (and the demo). The experts hold over 95% of a Qwen3-MoE model's
parameters, and MoE decode is bound by reading them: 8-bit experts halve the bytes per token of bf16 ones."""

from torch import nn

from qwen_fast.nn import MoEExperts, _hf
from qwen_fast.nn.experts import FORMATS
from qwen_fast.reference.quant import DEFAULT_BLOCK_SHAPE, quantize_fp8, quantize_int8

__all__ = ["quantize_experts", "quantize_fp8", "quantize_int8"]


def quantize_experts(model: nn.Module, format: str, block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> int:
    """Quantize every routed-experts module of `model` in place; returns how many were quantized.

    Each transformers experts module of a supported family (Qwen3MoeExperts, Qwen2MoeExperts, MixtralExperts,
    OlmoeExperts, DeepseekV3Experts) and each float qwen_fast.nn.MoEExperts is replaced by a qwen_fast.nn.MoEExperts
    holding the quantized weights (`MoEExperts.quantize`): its forward has the experts' contract, so the model's own
    MoE blocks call it unchanged, and `qwen_fast.patch(model)` afterwards takes it as it is. The float weights are
    released (unless something else holds them). Routers, attention, shared experts and embeddings keep their dtype.

    Args:
        model: a transformers model (or any module) with supported experts, not patched by qwen_fast (quantize
            first, then patch), not under transformers' tensor or expert parallelism.
        format: "fp8" (float8_e4m3fn, fp32 scales per block_shape block, as FP8 checkpoints) or "int8" (symmetric,
            one fp32 scale per output channel; block_shape unused).
        block_shape: fp8's [bn, bk] (128 x 128 by default, as Qwen3-*-FP8 checkpoints).

    Returns:
        The number of experts modules quantized.

    Raises:
        ValueError: an unknown format or block_shape, a patched or parallel model, experts already quantized (an
            FP8 checkpoint's FP8Experts, or quantize_experts run twice), or no experts found.

    Example:
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        ...     vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        ...     num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
        >>> qwen_fast.quantize_experts(model, "int8")
        2
        >>> model.model.layers[0].mlp.experts.gate_up_proj.dtype
        torch.int8
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if getattr(model, "_qwen_fast_patch", None) is not None:
        raise ValueError(
            f"{type(model).__name__} is patched by qwen_fast: quantize_experts before patch (undo() the handle, "
            "quantize, then patch again)"
        )
    targets = []
    for name, module in model.named_modules():
        quantized = _hf.is_fp8_experts(module) or getattr(module, "quantization", None) is not None
        if quantized:
            raise ValueError(f"{name} ({type(module).__name__}) is already quantized")
        known = isinstance(module, MoEExperts) or (type(module).__module__, type(module).__qualname__) in _hf.EXPERTS
        if known and _hf.is_distributed(module):
            raise ValueError(f"{name} runs under transformers' tensor or expert parallelism: quantize before sharding")
        if known:
            targets.append(name)
    if not targets:
        raise ValueError(f"quantize_experts found no experts module in {type(model).__name__} to quantize")
    swaps = []  # all checked (MoEExperts.from_hf) before anything changes
    for name in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        swaps.append((parent, attribute, MoEExperts.from_hf(getattr(parent, attribute))))
    for parent, attribute, experts in swaps:
        setattr(parent, attribute, experts.quantize(format, block_shape))
    return len(swaps)
