"""The transformers 5.x MoE classes that the modules' `from_hf` accept, and what each family's routing is.

Classes are recognised by their exact module path and name (transformers is not imported here, and a subclass that
may have changed the math is not taken for its parent). What each family does, from transformers 5.24's source:

| family      | router logits     | scores  | renormalize      | router weights returned | shared experts              |
|-------------|-------------------|---------|------------------|-------------------------|-----------------------------|
| Qwen3-MoE   | model dtype       | softmax | norm_topk_prob   | cast to the model dtype | none                        |
| Qwen2-MoE   | model dtype       | softmax | norm_topk_prob   | cast to the model dtype | shared_expert(x) * sigmoid( |
|             |                   |         |                  |                         |   shared_expert_gate(x))    |
| OLMoE       | model dtype       | softmax | norm_topk_prob   | cast to the model dtype | none                        |
| Mixtral     | model dtype       | softmax | always           | fp32                    | none (training: jitter)     |
| DeepSeek-V3 | fp32 (upcast)     | sigmoid | norm_topk_prob   | fp32, x routed_scaling  | shared_experts(x), added    |
|             | + bias, groups    |         | (/ sum + 1e-20)  |                         |                             |

Every router returns (router_logits [T, E], weights [T, k], indices int64 [T, k]); every block returns one tensor of
its input's shape.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_FAMILIES = {  # family -> transformers module
    "qwen3_moe": "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "qwen2_moe": "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "mixtral": "transformers.models.mixtral.modeling_mixtral",
    "olmoe": "transformers.models.olmoe.modeling_olmoe",
    "deepseek_v3": "transformers.models.deepseek_v3.modeling_deepseek_v3",
}


@dataclass(frozen=True)
class RouterSpec:
    """How a transformers router routes: what TopKRouter.from_hf reads from it."""

    casts_weights: bool  # returns its weights in the model dtype (else fp32)
    renormalize: Callable[[nn.Module], bool]
    routing_kwargs: Callable[[nn.Module], dict]  # TopKRouter keyword arguments beyond the common ones


def _norm_topk_prob(router: nn.Module) -> bool:
    return bool(router.norm_topk_prob)


def _softmax(router: nn.Module) -> dict:
    return {}


def _deepseek(router: nn.Module) -> dict:
    return {
        "scoring_func": "sigmoid",
        "e_score_correction_bias": True,
        "num_expert_group": router.num_group,
        "topk_group": router.topk_group,
        "routed_scaling_factor": float(router.routed_scaling_factor),
        "fp32_logits": True,
    }


_QWEN_LIKE = RouterSpec(True, _norm_topk_prob, _softmax)
ROUTERS = {
    (_FAMILIES["qwen3_moe"], "Qwen3MoeTopKRouter"): _QWEN_LIKE,
    (_FAMILIES["qwen2_moe"], "Qwen2MoeTopKRouter"): _QWEN_LIKE,
    (_FAMILIES["olmoe"], "OlmoeTopKRouter"): _QWEN_LIKE,
    (_FAMILIES["mixtral"], "MixtralTopKRouter"): RouterSpec(False, lambda router: True, _softmax),
    (_FAMILIES["deepseek_v3"], "DeepseekV3TopkRouter"): RouterSpec(False, _norm_topk_prob, _deepseek),
}

# experts class -> its family (all five share the layout gate_up_proj [E, 2I, H], down_proj [E, H, I])
EXPERTS = {
    (_FAMILIES[family], name): family
    for family, name in [
        ("qwen3_moe", "Qwen3MoeExperts"),
        ("qwen2_moe", "Qwen2MoeExperts"),
        ("mixtral", "MixtralExperts"),
        ("olmoe", "OlmoeExperts"),
        ("deepseek_v3", "DeepseekV3Experts"),
    ]
}

# block class -> the names of its shared-expert submodules, reused as they are (Qwen2-MoE: gated; DeepSeek-V3: added)
BLOCKS = {
    (_FAMILIES["qwen3_moe"], "Qwen3MoeSparseMoeBlock"): (),
    (_FAMILIES["qwen2_moe"], "Qwen2MoeSparseMoeBlock"): ("shared_expert", "shared_expert_gate"),
    (_FAMILIES["mixtral"], "MixtralSparseMoeBlock"): (),
    (_FAMILIES["olmoe"], "OlmoeSparseMoeBlock"): (),
    (_FAMILIES["deepseek_v3"], "DeepseekV3MoE"): ("shared_experts",),
}


def lookup(table: dict, module: object, caller: str):
    """table[module's exact class]; else a TypeError naming the class and the supported ones."""
    key = (type(module).__module__, type(module).__qualname__)
    if key in table:
        return table[key]
    supported = ", ".join(name for _, name in table)
    raise TypeError(f"{caller} does not support {key[0]}.{key[1]}; supported transformers 5.x classes: {supported}")


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register `source`'s forward (pre-)hooks on `target` too, e.g. transformers' output recorders when the model
    already ran with output_router_logits=True before the swap (its hooks are installed once per model)."""
    for name in _HOOK_DICTS:
        getattr(target, name).update(getattr(source, name))


def is_distributed(module: nn.Module) -> bool:
    """Whether transformers' tensor or expert parallelism runs `module`: it replaces the instance's `forward` with
    one that hands the module its local shards and adds the collectives (transformers 5.24
    distributed/tensor_parallel.py and expert_parallel.py, `install_forward`)."""
    return "forward" in vars(module)
