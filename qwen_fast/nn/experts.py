"""MoEExperts: the routed SwiGLU experts in transformers 5.x's layout, run by qwen_fast.fused_experts."""

import torch
from torch import nn

from qwen_fast.ops import FUSED_EXPERTS, fused_experts
from qwen_fast.ops._checks import check_int

from . import _hf


class MoEExperts(nn.Module):
    """E SwiGLU experts stored as two 3D parameters; stateless `forward(hidden, top_k_index, top_k_weights)`.

    Parameters (transformers 5.x names and layout, read in place by the kernels, never copied):
        gate_up_proj: [E, 2I, H], the model dtype: expert e's gate rows [:I], then its up rows [I:].
        down_proj: [E, H, I], the model dtype.

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
        return fused_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index)

    def run(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """`forward` without fused_experts' per-call input checks, for a caller whose inputs are valid by
        construction (SparseMoeBlock: [T, H] rows of the block's input, ids and weights from its own router)."""
        return FUSED_EXPERTS(
            hidden_states.device, hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index
        )

    def extra_repr(self) -> str:
        sizes = (self.num_experts, self.hidden_dim, self.intermediate_dim)
        return "num_experts={}, hidden_size={}, intermediate_size={}".format(*sizes)

    @classmethod
    def from_hf(cls, experts: nn.Module) -> "MoEExperts":
        """MoEExperts that SHARE `experts`' gate_up_proj and down_proj (the same Parameters, no copy); its forward
        hooks are carried over.

        Args:
            experts: transformers 5.x Qwen3MoeExperts, Qwen2MoeExperts, MixtralExperts, OlmoeExperts or
                DeepseekV3Experts with the SwiGLU activation ("silu"), concatenated gate/up rows, no bias.

        Raises:
            TypeError: another class (the message lists the supported ones).
            ValueError: an activation other than silu, or a transposed/biased/interleaved layout.
        """
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
