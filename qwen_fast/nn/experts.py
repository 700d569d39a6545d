"""MoEExperts: the routed SwiGLU experts in transformers 5.x's layout, run by qwen_fast.fused_experts; in the
model dtype, or quantized (fp8 block-scaled, int8 per channel)."""

import torch
from torch import nn

from qwen_fast.ops import FUSED_EXPERTS, fused_experts
from qwen_fast.ops._checks import check_int
from qwen_fast.reference.quant import DEFAULT_BLOCK_SHAPE, quantize_fp8, quantize_int8

from . import _hf

FORMATS = ("fp8", "int8")
_QUANTIZE = {"fp8": quantize_fp8, "int8": lambda weight, block_shape: quantize_int8(weight)}
_FLAGS = {"fp8": "use_fp8_w8a8", "int8": "use_int8_w8a16"}
_CHUNK_BYTES = 1 << 28  # quantize() works through this many bytes of fp32 weights at a time


class MoEExperts(nn.Module):
    """E SwiGLU experts stored as two 3D parameters; stateless `forward(hidden, top_k_index, top_k_weights)`.

    Parameters (transformers 5.x names and layout, read in place by the kernels, never copied):
        gate_up_proj: [E, 2I, H], the model dtype: expert e's gate rows [:I], then its up rows [I:].
        down_proj: [E, H, I], the model dtype.
    Quantized (`quantize("fp8" | "int8")`, or `from_hf` of transformers' FP8Experts), the same two in
    float8_e4m3fn or int8 plus their fp32 scales, named as transformers' FP8Experts (W = w * scale_inv):
        gate_up_proj_scale_inv: [E, ceil(2I/bn), ceil(H/bk)] (fp8, block_size (bn, bk)) or [E, 2I] (int8).
        down_proj_scale_inv: [E, ceil(H/bn), ceil(I/bk)] (fp8) or [E, H] (int8).
    `quantization` says which ("fp8", "int8" or None) and `block_size` is fp8's (bn, bk). The activations stay in
    the model dtype (qwen_fast.fused_experts' use_fp8_w8a8 / use_int8_w8a16).

    Token t's output is sum_j top_k_weights[t, j] * down(silu(gate(x)) * up(x)) over its k experts
    e = top_k_index[t, j], accumulated in fp32 and rounded once (qwen_fast.reference.moe states the math).

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I (transformers' moe_intermediate_size; Mixtral's and OLMoE's intermediate_size).
        device, dtype: of the parameters (initialised N(0, 1/fan_in)).

    Example:
        >>> experts = qwen_fast.nn.MoEExperts(num_experts=4, hidden_size=16, intermediate_size=8)
        >>> ids = torch.tensor([[0, 3], [2, 1], [3, 2]])
        >>> with torch.no_grad():  # inference: the kernels have no backward
        ...     experts(torch.randn(3, 16), ids, torch.full((3, 2), 0.5)).shape
        torch.Size([3, 16])
        >>> experts.quantize("fp8", block_shape=(8, 8)).gate_up_proj.dtype
        torch.float8_e4m3fn
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in [("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)]:  # fmt: skip
            check_int(name, value, low=1)
        # Attribute names as transformers' experts modules.
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.quantization: str | None = None
        self.block_size: tuple[int, int] | None = None
        self.register_parameter("gate_up_proj_scale_inv", None)
        self.register_parameter("down_proj_scale_inv", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1/fan_in) entries, so activations stay O(1)."""
        with torch.no_grad():
            self.gate_up_proj.normal_(0.0, self.hidden_dim**-0.5)
            self.down_proj.normal_(0.0, self.intermediate_dim**-0.5)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Run each token through its k experts and sum the weighted outputs.

        Args:
            hidden_states: [T, H], the parameters' dtype.
            top_k_index: [T, k] int32/int64 expert ids in [0, E).
            top_k_weights: [T, k] float (fp32 or the model dtype; used as fp32).

        Returns:
            [T, H] in hidden_states' dtype.
        """
        quant = {}
        if self.quantization is not None:
            quant = {_FLAGS[self.quantization]: True, "w1_scale": self.gate_up_proj_scale_inv,
                     "w2_scale": self.down_proj_scale_inv, "block_shape": self._block_shape()}  # fmt: skip
        return fused_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index, **quant)

    def run(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """`forward` without fused_experts' per-call input checks, for a caller whose inputs are valid by
        construction (SparseMoeBlock: [T, H] rows of the block's input, ids and weights from its own router)."""
        w13, w2, device = self.gate_up_proj, self.down_proj, hidden_states.device
        if self.quantization is None:
            return FUSED_EXPERTS(device, hidden_states, w13, w2, top_k_weights, top_k_index)
        scales = (self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self._block_shape())
        return FUSED_EXPERTS(device, hidden_states, w13, w2, top_k_weights, top_k_index, None, "silu", *scales)

    def _block_shape(self) -> list[int] | None:
        return None if self.block_size is None else list(self.block_size)

    @torch.no_grad()
    def quantize(self, format: str, block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> "MoEExperts":
        """Quantize the experts' weights in place and return self: "fp8" (float8_e4m3fn, fp32 scales per
        block_shape [bn, bk] block, as FP8 checkpoints: [128, 128]) or "int8" (symmetric per output channel;
        block_shape unused). New parameters replace the old ones (the module's own references to its float weights
        are dropped). Formats: qwen_fast.reference.quant.

        Raises:
            ValueError: an unknown format, a bad block_shape, or weights already quantized.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
        if self.quantization is not None:
            raise ValueError(f"these experts are already quantized ({self.quantization})")
        if format == "fp8":
            ok = isinstance(block_shape, (list, tuple)) and len(block_shape) == 2
            if not (ok and all(type(v) is int and v >= 1 for v in block_shape)):
                raise ValueError(f"block_shape must be two ints (bn, bk) >= 1, got {block_shape!r}")
        for name in ("gate_up_proj", "down_proj"):
            weight, scale = self._quantized(getattr(self, name), format, tuple(block_shape))
            setattr(self, name, nn.Parameter(weight, requires_grad=False))
            setattr(self, f"{name}_scale_inv", nn.Parameter(scale, requires_grad=False))
        self.quantization = format
        self.block_size = tuple(block_shape) if format == "fp8" else None
        return self

    @staticmethod
    def _quantized(weight: torch.Tensor, format: str, block_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_fp8 / quantize_int8 of [E, N, K] weights, a few experts at a time (bounded fp32 scratch)."""
        step = max(1, _CHUNK_BYTES // (weight[0].numel() * 4))
        parts = [_QUANTIZE[format](weight[e : e + step], block_shape) for e in range(0, weight.shape[0], step)]
        return torch.cat([w for w, _ in parts]), torch.cat([s for _, s in parts])

    def extra_repr(self) -> str:
        sizes = (self.num_experts, self.hidden_dim, self.intermediate_dim)
        text = "num_experts={}, hidden_size={}, intermediate_size={}".format(*sizes)
        if self.quantization is not None:
            text += f", quantization={self.quantization!r}"
            text += "" if self.block_size is None else f", block_size={self.block_size}"
        return text

    @classmethod
    def from_hf(cls, experts: nn.Module) -> "MoEExperts":
        """MoEExperts that SHARE `experts`' gate_up_proj and down_proj (the same Parameters, no copy; for FP8
        experts their scales too); its forward hooks are carried over. A MoEExperts (e.g. put in a transformers
        block by qwen_fast.quantize_experts) is returned as it is.

        Args:
            experts: transformers 5.x Qwen3MoeExperts, Qwen2MoeExperts, MixtralExperts, OlmoeExperts or
                DeepseekV3Experts with the SwiGLU activation ("silu"), concatenated gate/up rows, no bias; or
                transformers' FP8Experts (an FP8 checkpoint's experts: fp8 block-scaled weights, fp32 scales,
                dynamic activations).

        Raises:
            TypeError: another class (the message lists the supported ones).
            ValueError: an activation other than silu, or a transposed/biased/interleaved layout; for FP8Experts
                another format (FP4, UE8M0 or per-tensor scales, static activation scales).
        """
        if isinstance(experts, MoEExperts):
            return experts
        if _hf.is_fp8_experts(experts):
            return cls._from_fp8(experts)
        _hf.lookup(_hf.EXPERTS, experts, "MoEExperts.from_hf")
        activation = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if activation not in ("silu", "swish"):
            raise ValueError(f"MoEExperts computes SwiGLU (silu), got experts with hidden_act={activation!r}")
        layout = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}
        for flag, expected in layout.items():
            if getattr(experts, flag, expected) != expected:
                raise ValueError(f"MoEExperts needs experts with {flag}={expected}, got {flag}={not expected}")
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        new = cls(num_experts, hidden, two_i // 2, device="meta")  # no allocation: the parameters are experts' own
        new.gate_up_proj = experts.gate_up_proj
        new.down_proj = experts.down_proj
        new.train(experts.training)
        _hf.carry_hooks(experts, new)
        return new

    @classmethod
    def _from_fp8(cls, experts: nn.Module) -> "MoEExperts":
        """from_hf of transformers' FP8Experts: its fp8 weights and scales shared (_hf.fp8_experts_scales)."""
        w13_scale, w2_scale, block_shape = _hf.fp8_experts_scales(experts)
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        new = cls(num_experts, hidden, two_i // 2, device="meta")
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.gate_up_proj_scale_inv = (
            experts.gate_up_proj_scale_inv
            if w13_scale is experts.gate_up_proj_scale_inv
            else nn.Parameter(w13_scale, requires_grad=False)
        )
        new.down_proj_scale_inv = experts.down_proj_scale_inv
        new.quantization, new.block_size = "fp8", tuple(block_shape)
        new.train(experts.training)
        _hf.carry_hooks(experts, new)
        return new
