"""TopKRouter: router logits, then qwen_fast.fused_topk, as one module with transformers 5.x's parameter names.

transformers records `output_router_logits=True` with forward hooks on every module that `isinstance`-matches the
model's router class (`OutputRecorder(Qwen3MoeTopKRouter, index=0)` and the like). So `TopKRouter.from_hf(router)`
returns an instance of a subclass of both TopKRouter and the HF router's class (one cached class per HF class): the
recorder still finds it, reads element 0 of its output (the router logits) and computes the load-balancing loss
from exactly the logits transformers would have computed.
"""

import functools
import importlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qwen_fast.ops import FUSED_TOPK
from qwen_fast.ops._checks import check_int
from qwen_fast.ops.routing import check_routing_args

from . import _hf


def check_hidden_size(hidden_states: torch.Tensor, hidden_size: int) -> None:
    """hidden_states is [..., H] with H = hidden_size (checked before any reshape to [T, H] could hide a mismatch)."""
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states must have hidden size {hidden_size} in its last dimension, "
            f"got shape {tuple(hidden_states.shape)}"
        )


class TopKRouter(nn.Module):
    """Router logits then top-k expert choice: `forward(hidden) -> (router_logits, weights, ids)`.

    Parameters and buffers (transformers 5.x names, so state dicts load unchanged):
        weight: [E, H], the model dtype (DeepSeek-V3 keeps it in fp32).
        e_score_correction_bias: [E] float32 buffer, only when `e_score_correction_bias=True` (DeepSeek-V3).

    Numerics (qwen_fast.reference.routing states the math):
        router_logits = hidden @ weight.T in the model dtype, or in fp32 on upcast operands when `fp32_logits`
        (DeepSeek-V3). Scores, top-k and renormalization run in fp32 inside fused_topk (ties to the lower expert
        index). `weights_dtype="float32"` returns those fp32 weights; `weights_dtype="logits"` casts them to the
        logits' dtype, as transformers' Qwen3-MoE, Qwen2-MoE and OLMoE routers do (bit-for-bit HF parity there).

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: k experts per token, 1 <= k <= E.
        renormalize: divide the k weights by their sum (HF `norm_topk_prob`; always on for Mixtral).
        scoring_func: "softmax" or "sigmoid" (DeepSeek-V3).
        e_score_correction_bias: register the [E] fp32 selection-bias buffer (zeros until loaded).
        num_expert_group, topk_group: group-limited top-k (DeepSeek-V3 `n_group`, `topk_group`), both or neither.
        routed_scaling_factor: multiplies the final weights (DeepSeek-V3: 2.5).
        group_scoring: how a group is scored, "max" (DeepSeek-V2), "top2_sum" (DeepSeek-V3) or None (vLLM's rule:
            "top2_sum" with a selection bias, "max" without); see qwen_fast.fused_topk.
        fp32_logits: compute the logits in fp32 (DeepSeek-V3), else in the model dtype.
        weights_dtype: "float32" (default, the most accurate) or "logits" (transformers' cast, see above).
        index_dtype: dtype of the returned ids: torch.int32 (fused_topk's) or torch.int64 (torch.topk's, what HF's
            own experts need for one_hot; `from_hf` routers use it).
        device, dtype: of `weight` (initialised N(0, 1/H)).

    Example:
        >>> router = qwen_fast.nn.TopKRouter(hidden_size=16, num_experts=8, top_k=2)
        >>> with torch.no_grad():  # inference: the kernels have no backward
        ...     logits, weights, ids = router(torch.randn(5, 16))
        >>> tuple(logits.shape), weights.dtype, ids.dtype, tuple(ids.shape)
        ((5, 8), torch.float32, torch.int32, (5, 2))
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        *,
        scoring_func: str = "softmax",
        e_score_correction_bias: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        group_scoring: str | None = None,
        fp32_logits: bool = False,
        weights_dtype: Literal["float32", "logits"] = "float32",
        index_dtype: torch.dtype = torch.int32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # nn.Module.__init__ directly: in a from_hf subclass the next class in the MRO is the HF router, whose
        # __init__ wants a config; this class sets everything it needs itself.
        nn.Module.__init__(self)
        check_int("hidden_size", hidden_size, low=1)
        check_int("num_experts", num_experts, low=1)
        # The routing arguments are checked once here by fused_topk's own checks (on an empty [0, E] stand-in).
        bias = torch.zeros(num_experts, dtype=torch.float32, device=device) if e_score_correction_bias else None
        stand_in = torch.empty(0, num_experts, device=device)
        check_routing_args(
            stand_in,
            top_k,
            renormalize,
            scoring_func,
            bias,
            num_expert_group,
            topk_group,
            routed_scaling_factor,
            group_scoring,
        )
        if weights_dtype not in ("float32", "logits"):
            raise ValueError(f"weights_dtype must be 'float32' or 'logits', got {weights_dtype!r}")
        if index_dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        # Attribute names shared with transformers' routers where they exist (top_k, num_experts, hidden_dim).
        self.hidden_dim = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.group_scoring = group_scoring
        self.fp32_logits = fp32_logits
        self.weights_dtype = weights_dtype
        self.index_dtype = index_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        if bias is not None:
            self.register_buffer("e_score_correction_bias", bias)
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, 1/H), so router logits are O(1); the selection bias (if any) is zero."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.hidden_dim**-0.5)
            if self.e_score_correction_bias is not None:
                self.e_score_correction_bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route each token.

        Args:
            hidden_states: [..., H] (flattened to [T, H]), the weight's dtype unless `fp32_logits`.

        Returns:
            router_logits: [T, E], the model dtype (fp32 when `fp32_logits`).
            weights: [T, k], fp32 (or the logits' dtype with weights_dtype="logits").
            ids: [T, k], `index_dtype`, in descending order of selection score.
        """
        check_hidden_size(hidden_states, self.hidden_dim)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.fp32_logits:
            router_logits = F.linear(hidden_states.float(), self.weight.float())
        else:
            router_logits = F.linear(hidden_states, self.weight)
        # The routing arguments were checked at construction and the logits are this router's own [T, E]: the op
        # entry, without fused_topk's per-call checks.
        weights, ids = FUSED_TOPK(
            router_logits.device,
            router_logits,
            self.top_k,
            self.renormalize,
            scoring_func=self.scoring_func,
            e_score_correction_bias=self.e_score_correction_bias,
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
            group_scoring=self.group_scoring,
        )
        if self.weights_dtype == "logits":
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, ids.to(self.index_dtype)

    def extra_repr(self) -> str:
        text = f"hidden_size={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
        text += f"renormalize={self.renormalize}, scoring_func={self.scoring_func!r}"
        if self.num_expert_group is not None:
            text += f", num_expert_group={self.num_expert_group}, topk_group={self.topk_group}"
            text += f", group_scoring={self.group_scoring!r}"
        if self.routed_scaling_factor != 1.0:
            text += f", routed_scaling_factor={self.routed_scaling_factor}"
        return text + f", fp32_logits={self.fp32_logits}, weights_dtype={self.weights_dtype!r}"

    @classmethod
    def from_hf(cls, router: nn.Module, hf_parity: bool = False) -> "TopKRouter":
        """A TopKRouter that SHARES `router`'s parameters (same tensors, no copy) and is still an instance of
        `type(router)` (its class is `QwenFast<HFName>(TopKRouter, HFRouter)`), so transformers' router-logits
        recorder hooks it. Its forward hooks are carried over.

        Args:
            router: a transformers 5.x router: Qwen3MoeTopKRouter, Qwen2MoeTopKRouter, MixtralTopKRouter,
                OlmoeTopKRouter or DeepseekV3TopkRouter.
            hf_parity: cast the weights where transformers casts them (to the model dtype for Qwen3-MoE, Qwen2-MoE
                and OLMoE); default False keeps fp32 weights. The ids are int64, as torch.topk's.

        Raises:
            TypeError: `router` is not one of the supported classes (the message lists them).
        """
        spec = _hf.lookup(_hf.ROUTERS, router, "TopKRouter.from_hf")
        new = _hf_subclass(type(router))(
            router.weight.shape[1],
            router.weight.shape[0],
            router.top_k,
            spec.renormalize(router),
            weights_dtype="logits" if hf_parity and spec.casts_weights else "float32",
            index_dtype=torch.int64,
            device="meta",  # no allocation: the parameters below are router's own
            **spec.routing_kwargs(router),
        )
        new.weight = router.weight
        if new.e_score_correction_bias is not None:
            new.e_score_correction_bias = router.e_score_correction_bias
        new.train(router.training)
        _hf.carry_hooks(router, new)
        return new


@functools.cache
def _hf_subclass(hf_class: type[nn.Module]) -> type[TopKRouter]:
    """The class `QwenFast<HFName>(TopKRouter, hf_class)`: TopKRouter's behaviour, the HF router's type (cached)."""
    return type(f"QwenFast{hf_class.__name__}", (TopKRouter, hf_class), {"__module__": __name__})


def __getattr__(name: str) -> type[TopKRouter]:
    """`qwen_fast.nn.router.QwenFast<HFName>`: pickle finds the from_hf classes by module and name."""
    for module, hf_name in _hf.ROUTERS:
        if name == f"QwenFast{hf_name}":
            return _hf_subclass(getattr(importlib.import_module(module), hf_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
