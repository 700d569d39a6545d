"""SparseMoeBlock: router + routed experts + optional shared expert(s), a drop-in for transformers' MoE blocks."""

import torch
from torch import nn

from . import _hf
from .experts import MoEExperts
from .router import TopKRouter, check_hidden_size


class SparseMoeBlock(nn.Module):
    """A Mixture-of-Experts layer: `forward(hidden [..., H]) -> [..., H]`, what transformers' blocks return.

        out = experts(x, ids, weights)                         ids, weights from gate(x) (qwen_fast.fused_topk)
            + sigmoid(shared_expert_gate(x)) * shared_expert(x)   Qwen2-MoE (without a gate: shared_expert(x))
            + shared_experts(x)                                  DeepSeek-V3

    Submodules keep transformers' names (gate, experts, shared_expert, shared_expert_gate, shared_experts), so a
    patched model's state_dict has the same keys. The gate is called as a module: hooks on it (transformers'
    output_router_logits recorder) see its (router_logits, weights, ids).

    Backends: a forced backend (qwen_fast.use_backend, QWEN_FAST_BACKEND) runs both the routing and the experts'
    kernels (every backend has fused_topk). The block checks its input's hidden size; the router and experts then
    run their op entries without the functional API's per-call checks (their arguments are valid by construction).

    HF parity. `from_hf(block, hf_parity=False)` (the default) feeds the router's fp32 weights straight into the
    fp32 combine: more accurate than transformers, which casts them to the model dtype for Qwen3-MoE, Qwen2-MoE and
    OLMoE. `hf_parity=True` casts exactly where transformers casts (model dtype for Qwen3-MoE, Qwen2-MoE, OLMoE;
    fp32 kept for Mixtral and DeepSeek-V3), so the routing weights are transformers' own, bit for bit. The outputs
    then differ from the unpatched block only by the combine (fp32 sum, one rounding, where transformers rounds
    per expert in the model dtype) and the kernels' summation order: within the fp32 tolerance in fp32 and the bf16
    tolerance in bf16 (tests/test_nn_moe.py). Routing ties (exactly equal scores, common with bf16 logits) go to
    the lower expert index here, wherever torch.topk puts them in transformers.

    Args:
        gate: the router, TopKRouter [E, H].
        experts: the routed experts, MoEExperts with the gate's E and H, in the model dtype or quantized (or, under
            transformers' tensor or expert parallelism, transformers' experts module with its parallel forward: see
            from_hf).
        shared_expert: a module [T, H] -> [T, H] added to every token (Qwen2-MoE), or None.
        shared_expert_gate: a module [T, H] -> [T, 1] whose sigmoid scales shared_expert's output, or None.
        shared_experts: a module [T, H] -> [T, H] added to every token (DeepSeek-V3's name), or None.
        jitter_noise: Mixtral's training-time input jitter (x times U(1 - j, 1 + j), applied in training mode only;
            transformers multiplies the caller's tensor in place, this block does not).

    Example:
        >>> gate = qwen_fast.nn.TopKRouter(hidden_size=16, num_experts=8, top_k=2)
        >>> block = qwen_fast.nn.SparseMoeBlock(gate, qwen_fast.nn.MoEExperts(8, 16, 32))
        >>> with torch.no_grad():  # inference: the kernels have no backward
        ...     block(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])

        From a transformers block, sharing its parameters:
        >>> from transformers import Qwen3MoeConfig
        >>> from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        >>> config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=2)
        >>> hf_block = Qwen3MoeSparseMoeBlock(config)
        >>> block = qwen_fast.nn.SparseMoeBlock.from_hf(hf_block, hf_parity=True)
        >>> block.experts.gate_up_proj is hf_block.experts.gate_up_proj
        True
    """

    def __init__(
        self,
        gate: TopKRouter,
        experts: MoEExperts,
        *,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        shared_experts: nn.Module | None = None,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(gate, TopKRouter):
            raise TypeError(f"gate must be a qwen_fast.nn.TopKRouter, got {type(gate).__name__}")
        self._parallel_experts = not isinstance(experts, MoEExperts) and _hf.is_distributed(experts)
        if not (isinstance(experts, MoEExperts) or self._parallel_experts):
            raise TypeError(f"experts must be a qwen_fast.nn.MoEExperts, got {type(experts).__name__}")
        if not self._parallel_experts and (gate.num_experts, gate.hidden_dim) != (
            experts.num_experts,
            experts.hidden_dim,
        ):
            raise ValueError(
                f"gate (E={gate.num_experts}, H={gate.hidden_dim}) and experts (E={experts.num_experts}, "
                f"H={experts.hidden_dim}) must have the same number of experts and hidden size"
            )
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("shared_expert_gate scales shared_expert: give shared_expert too")
        if shared_expert is not None and shared_experts is not None:
            raise ValueError("give shared_expert (Qwen2-MoE) or shared_experts (DeepSeek-V3), not both")
        if not 0.0 <= jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1), got {jitter_noise}")
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.shared_experts = shared_experts
        self.jitter_noise = jitter_noise

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Args: hidden_states [..., H] (e.g. [B, S, H]), the model dtype. Returns: the same shape and dtype."""
        check_hidden_size(hidden_states, self.gate.hidden_dim)
        x = hidden_states.reshape(-1, self.gate.hidden_dim)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        _, weights, ids = self.gate(x)  # called as a module: output_router_logits reads it through hooks
        # transformers' parallel experts are called as modules: their installed forward brings the local shards and
        # the collectives, and runs the experts implementation (qwen_fast's, which patch selects) on them
        out = self.experts(x, ids, weights) if self._parallel_experts else self.experts.run(x, ids, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(hidden_states.shape)

    @classmethod
    def from_hf(cls, block: nn.Module, hf_parity: bool = False) -> "SparseMoeBlock":
        """A SparseMoeBlock that SHARES `block`'s parameters: the same Parameter objects in the router and the
        experts, the shared-expert submodules reused as they are. Nothing is copied; `block` itself is unchanged.

        Args:
            block: a transformers 5.x Qwen3MoeSparseMoeBlock, Qwen2MoeSparseMoeBlock, MixtralSparseMoeBlock,
                OlmoeSparseMoeBlock or DeepseekV3MoE. top_k, norm_topk_prob, n_group, topk_group,
                routed_scaling_factor and the selection bias are read from its router. Its experts may be
                transformers' FP8Experts (an FP8 checkpoint) or a quantized MoEExperts (qwen_fast.quantize_experts):
                MoEExperts.from_hf.
            hf_parity: cast the routing weights where transformers does (see the class docstring).

        Under transformers' tensor or expert parallelism (a model loaded with `tp_plan` or a `DistributedConfig`)
        the block keeps `block.experts` itself, with the forward transformers installed on it (local shards,
        all-reduce or all-to-all); it runs the experts implementation of the model's config, which
        `qwen_fast.patch` sets to qwen_fast's.

        Raises:
            TypeError: another class (the message names it and the supported ones).
        """
        shared_names = _hf.lookup(_hf.BLOCKS, block, "SparseMoeBlock.from_hf")
        experts = block.experts if _hf.is_distributed(block.experts) else MoEExperts.from_hf(block.experts)
        new = cls(
            TopKRouter.from_hf(block.gate, hf_parity),
            experts,
            jitter_noise=float(getattr(block, "jitter_noise", 0.0)),
            **{name: getattr(block, name) for name in shared_names},
        )
        new.train(block.training)
        _hf.carry_hooks(block, new)
        return new
