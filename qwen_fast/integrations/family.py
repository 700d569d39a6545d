"""What `qwen_fast.patch` swaps in one transformers model family; one file per family declares its `FAMILY`.

A family names transformers 5.x classes, matched by exact class name while walking the model:
- `moe_block`: replaced by `qwen_fast.nn.SparseMoeBlock.from_hf` (router + fused experts, parameters shared);
- `attention`: the attention class, and how qwen_fast serves it (`route`):
  - "module": replaced by `qwen_fast.nn.GQAAttention.from_hf` (reads a PagedKVCache's pages in place, q/k norm +
    RoPE + cache write fused);
  - "interface": left in place, the model's attention implementation switched to "qwen_fast"
    (`qwen_fast.integrations.register`): transformers' module projects q/k/v and applies RoPE, qwen_fast attends;
  - "": not served, `reason` says why.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # as users know it, e.g. "Qwen3-MoE"
    model_type: str  # config.model_type
    moe_block: str | None  # MoE block class name, None for dense models
    attention: str  # attention class name
    route: str  # "module", "interface" or "" (see the module docstring)
    reason: str = ""  # why attention is not served (route "")

    def __post_init__(self) -> None:
        if self.route not in ("module", "interface", ""):
            raise ValueError(f"route must be 'module', 'interface' or '', got {self.route!r}")
        if (self.route == "") != bool(self.reason):
            raise ValueError(f"{self.name}: give a reason exactly when attention is not served (route '')")
