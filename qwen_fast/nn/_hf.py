"""The transformers 5.x classes that the modules' `from_hf` accept, derived from the family records
(qwen_fast/families/, one file per family, which also say how each router routes).

Classes are recognised by their exact module path and name (transformers is not imported here, and a subclass that
may have changed the math is not taken for its parent). Every router returns (router_logits [T, E], weights [T, k],
indices int64 [T, k]); every block returns one tensor of its input's shape; every experts class has the layout
gate_up_proj [E, 2I, H], down_proj [E, H, I].
"""

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
