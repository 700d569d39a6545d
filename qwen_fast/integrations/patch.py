"""qwen_fast.patch: swap qwen_fast's modules into a loaded transformers model in place, and undo it exactly.

The model is walked once and each module whose class a family file names (qwen_fast/families/<family>.py) is
handled as that family says: MoE blocks become `qwen_fast.nn.SparseMoeBlock`, Qwen attention becomes
`qwen_fast.nn.GQAAttention` (both share the original's parameters: nothing is copied), and Mixtral/OLMoE attention
switches the model to the "qwen_fast" attention implementation. The LM head, when it is a plain nn.Linear, becomes a
`qwen_fast.nn.Linear` sharing its weight (the linear op at decode sizes on CPU, F.linear otherwise). Nothing global
changes: the swaps live in this model only, and `PatchHandle.undo()` puts the original module objects back and
restores the attention implementation. Matching is by class, not by model type, so a model that embeds a supported
decoder (a multimodal wrapper) is patched too.
"""

import logging
from collections import Counter

from torch import nn

from qwen_fast.families import FAMILIES, Family
from qwen_fast.nn import GQAAttention, Linear, SparseMoeBlock
from qwen_fast.nn._hf import carry_hooks, is_distributed

logger = logging.getLogger("qwen_fast")

_MOE_BLOCKS = {f.moe_block: f for f in FAMILIES if f.moe_block}
_ATTENTION = {f.attention: f for f in FAMILIES}
# Class-name endings of modules a user would expect patched; met in an unknown model, they are listed as not patched.
_LOOKS_PATCHABLE = ("Attention", "SparseMoeBlock", "MoE", "MoeBlock")


class PatchHandle:
    """What `qwen_fast.patch` did to one model, and how to take it back.

    Attributes:
        patched: lines "count x OriginalClass -> what serves it now".
        not_patched: lines "count x Class: why not".

    `undo()` (or leaving a `with qwen_fast.patch(model):` block) restores the original module objects, the hooks
    registered on the replacements meanwhile (e.g. transformers' router-logits recorder), and the attention
    implementation; the model's outputs are then bit-identical to before. A second `undo()` does nothing.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.patched: list[str] = []
        self.not_patched: list[str] = []
        self.active = True
        self._swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, attribute, original, new)
        self._attn_implementation: str | None = None  # the model's own, while "qwen_fast" is set
        self._experts_implementation: str | None = None  # the model's own, while "qwen_fast" runs parallel experts

    def undo(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        if not self.active:
            return
        for parent, attribute, original, new in reversed(self._swaps):
            if getattr(parent, attribute) is not new:
                raise RuntimeError(
                    f"cannot undo qwen_fast.patch: {type(parent).__name__}.{attribute} was replaced after patching"
                )
            pairs = [(new, original)]
            if isinstance(new, SparseMoeBlock):
                pairs += [(new.gate, original.gate), (new.experts, original.experts)]
            for source, target in pairs:  # hooks added while patched, e.g. transformers' output recorders
                carry_hooks(source, target)
            original.train(new.training)
            setattr(parent, attribute, original)
        if self._attn_implementation is not None:
            self.model.set_attn_implementation(self._attn_implementation)
        if self._experts_implementation is not None:
            self.model.set_experts_implementation(self._experts_implementation)
        self.active = False
        del self.model._qwen_fast_patch

    def summary(self) -> str:
        lines = [f"qwen_fast.patch({type(self.model).__name__}){'' if self.active else ' (undone)'}:"]
        lines += [f"  patched: {line}" for line in self.patched]
        lines += [f"  not patched: {line}" for line in self.not_patched]
        return "\n".join(lines)

    __repr__ = summary

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch(model: nn.Module, moe: bool = True, attention: bool = True, *, hf_parity: bool = True) -> PatchHandle:
    """Swap qwen_fast's fused modules into a transformers 5.x model, in place; returns a handle whose `undo()`
    restores it.

    Supported: Qwen3-MoE, Qwen3, Qwen2-MoE, Qwen2 (MoE blocks and attention modules swapped), Mixtral and OLMoE (MoE
    blocks swapped, attention through the "qwen_fast" attention implementation), DeepSeek-V3 (MoE blocks; its latent
    attention stays transformers'). Quantized experts are swapped in too: an FP8 checkpoint's FP8Experts (fp8 weights
    and block scales shared) and the MoEExperts of qwen_fast.quantize_experts (quantize before patching). Patch after
    moving the model to its device and dtype. For the paged serving path pass a `qwen_fast.PagedKVCache.for_model(model,
    ...)` as the cache.

    Args:
        model: a loaded transformers model (e.g. Qwen3MoeForCausalLM), or any module containing supported blocks.
        moe: swap the MoE blocks (router + experts) for qwen_fast.nn.SparseMoeBlock.
        attention: serve attention with qwen_fast's kernels.
        hf_parity: cast routing weights where transformers does (SparseMoeBlock.from_hf), so that routing is
            transformers' own; False keeps them fp32 (slightly more accurate, not bit-compatible).

    Returns:
        PatchHandle: `.patched` / `.not_patched` say what happened; `.undo()` takes it back.

    Raises:
        ValueError: nothing requested, the model already patched, or nothing in it that qwen_fast can patch (the
            message lists what was found and why it was not patched).

    Modules that look patchable but are not (an unsupported attention class, an unknown MoE block) are listed in
    `handle.not_patched` and in one warning on the `qwen_fast` logger.

    Example:
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        >>> model = Qwen3MoeForCausalLM(config).eval()
        >>> handle = qwen_fast.patch(model)
        >>> print(handle)
        qwen_fast.patch(Qwen3MoeForCausalLM):
          patched: 2 x Qwen3MoeAttention -> qwen_fast.nn.GQAAttention
          patched: 2 x Qwen3MoeSparseMoeBlock -> qwen_fast.nn.SparseMoeBlock
          patched: 1 x Linear (lm_head) -> qwen_fast.nn.Linear
        >>> handle.undo()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not (moe or attention):
        raise ValueError("qwen_fast.patch: moe=False and attention=False leave nothing to patch")
    if getattr(model, "_qwen_fast_patch", None) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by qwen_fast: undo() that handle first")

    handle = PatchHandle(model)
    patched, not_patched, interface = Counter(), Counter(), Counter()
    swaps: list[tuple[str, nn.Module]] = []  # built first: a module that cannot be patched changes nothing
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        family = _family(module)
        if cls in _MOE_BLOCKS and family is not None:
            if moe:
                swaps.append((name, SparseMoeBlock.from_hf(module, hf_parity=hf_parity)))
                patched[f"{cls} -> qwen_fast.nn.SparseMoeBlock"] += 1
        elif cls in _ATTENTION and family is not None:
            if not attention:
                continue
            if family.route == "module":
                swaps.append((name, GQAAttention.from_hf(module)))
                patched[f"{cls} -> qwen_fast.nn.GQAAttention"] += 1
            elif family.route == "interface":
                interface[cls] += 1
            else:
                not_patched[f"{cls}: {family.reason}"] += 1
        elif cls in _MOE_BLOCKS or cls in _ATTENTION:
            not_patched[f"{cls} from {type(module).__module__}: not transformers' class of that name"] += 1
        elif cls.endswith(_LOOKS_PATCHABLE) and not isinstance(module, (SparseMoeBlock, GQAAttention)):
            not_patched[f"{cls}: not a class qwen_fast supports"] += 1
    head = _lm_head(model) if swaps or interface else None
    if head is not None:
        swaps.append((head, Linear.from_hf(model.get_submodule(head))))
        patched[f"Linear ({head}) -> qwen_fast.nn.Linear"] += 1
    for name, new in swaps:
        _swap(model, name, new, handle)
    if any(getattr(new, "_parallel_experts", False) for _, new in swaps):
        # transformers' tensor/expert-parallel experts keep their installed forward (local shards, collectives) and
        # run the model's experts implementation inside it: make that qwen_fast's
        from .interfaces import register

        handle._experts_implementation = model.config._experts_implementation
        model.set_experts_implementation(register())
    if any(isinstance(new, GQAAttention) for _, new in swaps):
        # GQAAttention reads flash-style masks (None without padding, else the 2D key padding), which the
        # "qwen_fast" mask implementation gives; a module transformers cannot switch keeps its 4D masks.
        _use_attention_interface(model, handle)
    for cls, count in interface.items():
        reason = _use_attention_interface(model, handle)
        if reason:
            not_patched[f"{cls}: {reason}"] += count
        else:
            patched[f"{cls} -> attention through the 'qwen_fast' attention implementation"] += count

    handle.patched = [f"{count} x {line}" for line, count in patched.items()]
    handle.not_patched = [f"{count} x {line}" for line, count in not_patched.items()]
    if not handle.patched:
        supported = ", ".join(f.name for f in FAMILIES)
        found = "; ".join(handle.not_patched) or "no MoE block or attention module of a supported class"
        raise ValueError(
            f"qwen_fast.patch(moe={moe}, attention={attention}) found nothing to patch in {type(model).__name__} "
            f"({found}); supported families: {supported}"
        )
    model._qwen_fast_patch = handle
    if handle.not_patched:
        logger.warning("%s", handle.summary())
    return handle


def _family(module: nn.Module) -> Family | None:
    """The family whose transformers module defines `module`'s class (as the modules' from_hf match: by module path
    and name, so a remote-code class that borrows a supported name is not taken for it), or None."""
    cls = type(module)
    family = _MOE_BLOCKS.get(cls.__name__) or _ATTENTION.get(cls.__name__)
    if family is None or cls.__module__ != family.module:
        return None
    return family


def _lm_head(model: nn.Module) -> str | None:
    """The name of `model`'s output embeddings when they are a plain nn.Linear that tensor parallelism does not run
    (qwen_fast.nn.Linear serves it then), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or is_distributed(head):
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _swap(model: nn.Module, name: str, new: nn.Module, handle: PatchHandle) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    handle._swaps.append((parent, attribute, getattr(parent, attribute), new))
    setattr(parent, attribute, new)


def _use_attention_interface(model: nn.Module, handle: PatchHandle) -> str:
    """Switch `model` to the "qwen_fast" attention implementation; returns why not, or "" when done."""
    if handle._attn_implementation is not None:
        return ""
    if not hasattr(model, "set_attn_implementation"):
        return "served through the attention implementation, which only a transformers PreTrainedModel can switch"
    from .interfaces import register

    before = model.config._attn_implementation
    model.set_attn_implementation(register())
    if model.config._attn_implementation != "qwen_fast":
        return f"{type(model).__name__} cannot switch its attention implementation (transformers refused)"
    handle._attn_implementation = before
    return ""
