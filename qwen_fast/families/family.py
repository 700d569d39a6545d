"""Family (one per file of qwen_fast/families/) and RouterSpec: what qwen_fast takes from a transformers family."""

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class RouterSpec:
    """How a transformers router routes: what qwen_fast.nn.TopKRouter.from_hf reads from it."""

    casts_weights: bool  # returns its weights in the model dtype (else fp32)
    renormalize: Callable[[nn.Module], bool]
    routing_kwargs: Callable[[nn.Module], dict] = lambda router: {}  # TopKRouter arguments beyond the common ones


def norm_topk_prob(router: nn.Module) -> bool:
    """The router's own renormalization flag (Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3)."""
    return bool(router.norm_topk_prob)


@dataclass(frozen=True)
class Family:
    """One transformers family. Class names are those of `transformers.models.<model_type>.modeling_<model_type>`.

    prefix: the classes' common prefix ("Qwen3Moe": Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeRotaryEmbedding).
    attention: the attention class, served as `route` says:
      "module": replaced by qwen_fast.nn.GQAAttention.from_hf (reads a PagedKVCache's pages in place, q/k norm +
        RoPE + cache write fused);
      "interface": left in place, the model switched to the "qwen_fast" attention implementation (transformers'
        module projects q/k/v and applies RoPE, qwen_fast attends);
      "": not served, `reason` says why.
    moe_block, router, experts: the MoE classes (None for a dense family); routing: how the router routes;
    shared: the block's shared-expert submodules, reused as they are (added to the routed output by
    qwen_fast.nn.SparseMoeBlock).
    tiny: config arguments of the family's tiny test model, beyond tests/tiny_models.py's common ones.
    """

    name: str  # as users know it, e.g. "Qwen3-MoE"
    model_type: str  # config.model_type
    prefix: str
    attention: str
    route: str
    reason: str = ""
    moe_block: str | None = None
    router: str | None = None
    experts: str | None = None
    routing: RouterSpec | None = None
    shared: tuple[str, ...] = ()
    tiny: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.route not in ("module", "interface", ""):
            raise ValueError(f"{self.name}: route must be 'module', 'interface' or '', got {self.route!r}")
        if (self.route == "") != bool(self.reason):
            raise ValueError(f"{self.name}: give a reason exactly when attention is not served (route '')")
        moe = (self.moe_block, self.router, self.experts, self.routing)
        if any(part is None for part in moe) and any(part is not None for part in moe):
            raise ValueError(f"{self.name}: give moe_block, router, experts and routing together, or none of them")

    @property
    def module(self) -> str:
        """The transformers module that defines the family's classes."""
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"
