"""The transformers 5.x classes that the modules' `from_hf` accept, derived from the family records
(qwen_fast/families/, one file per family, which also say how each router routes).

Classes are recognised by their exact module path and name (transformers is not imported here, and a subclass that
may have changed the math is not taken for its parent). Every router returns (router_logits [T, E], weights [T, k],
indices int64 [T, k]); every block returns one tensor of its input's shape; every experts class has the layout
gate_up_proj [E, 2I, H], down_proj [E, H, I].
"""

import torch
from torch import nn

from qwen_fast.families import FAMILIES

_MOE = [family for family in FAMILIES if family.moe_block]
ROUTERS = {(family.module, family.router): family.routing for family in _MOE}  # router class -> RouterSpec
EXPERTS = {(family.module, family.experts): family.model_type for family in _MOE}  # experts class -> its family
BLOCKS = {(family.module, family.moe_block): family.shared for family in _MOE}  # block class -> shared experts
ATTENTION = {(family.module, family.attention): family for family in FAMILIES if family.route == "module"}


def lookup(table: dict, module: object, caller: str):
    """table[module's exact class]; else a TypeError naming the class and the supported ones."""
    key = (type(module).__module__, type(module).__qualname__)
    if key in table:
        return table[key]
    supported = ", ".join(sorted(name for _, name in table))
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


FP8_EXPERTS = ("transformers.integrations.finegrained_fp8", "FP8Experts")  # what an FP8 checkpoint's experts load as


def is_fp8_experts(module: nn.Module) -> bool:
    return (type(module).__module__, type(module).__qualname__) == FP8_EXPERTS


def fp8_experts_scales(experts: nn.Module) -> tuple:
    """(gate_up_proj_scale_inv, down_proj_scale_inv, block_size as a list) of transformers' FP8Experts, checked for
    what qwen_fast computes: fp8 block-scaled weights with fp32 scales, dynamic activations, gated SwiGLU, no bias.

    transformers allocates gate_up_proj_scale_inv with at least 2 block rows (room for a separately quantized gate
    and up); when 2I fits in one block the extra row is never read, and a view of the first ceil(2I / bn) rows is
    returned.

    Raises:
        ValueError: another format (FP4 weights, UE8M0 or per-tensor scales, static activation scales) or
            activation (the message names it).
    """
    cls = type(experts).__name__
    problems = {
        "activation_scheme": (getattr(experts, "activation_scheme", "dynamic"), "dynamic"),
        "gate_up_proj dtype": (experts.gate_up_proj.dtype, torch.float8_e4m3fn),
        "scale dtype": (experts.gate_up_proj_scale_inv.dtype, torch.float32),
        "has_gate": (getattr(experts, "has_gate", True), True),
        "has_bias": (getattr(experts, "has_bias", False), False),
        "block_size is None": (experts.block_size is None, False),
    }
    problems |= {name: (getattr(experts, name, None), None) for name in ("swiglu_alpha", "limit", "gate_softcap")}
    problems["act_fn"] = (getattr(experts.config, "hidden_act", "silu") in ("silu", "swish"), True)
    for what, (found, needed) in problems.items():
        if found != needed:
            raise ValueError(
                f"qwen_fast runs FP8 experts with fp8 (e4m3) block-scaled weights, fp32 scales, dynamic activations "
                f"and SwiGLU; {cls} has {what} = {found!r} (needs {needed!r})"
            )
    bn, bk = (int(v) for v in experts.block_size)
    rows = (experts.gate_up_proj.shape[1] + bn - 1) // bn
    w13_scale = experts.gate_up_proj_scale_inv
    if w13_scale.shape[1] != rows:
        w13_scale = w13_scale[:, :rows]
    return w13_scale, experts.down_proj_scale_inv, [bn, bk]
