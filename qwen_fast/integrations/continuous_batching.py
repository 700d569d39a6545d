"""Let transformers' continuous batching (`generate_batch`, `init_continuous_batching`) run qwen_fast's attention.

transformers 5.24 has no public way to add an attention implementation to continuous batching: its manager
(`ContinuousBatchingManager.switch_to_cb_friendly_attn`) accepts only "paged|eager", "sdpa" and names containing
"flash", and a "flash" name is fetched from the Hub as a kernel. qwen_fast's attention function already reads what
continuous batching passes (sequences packed in one row with `cu_seq_lens_q/k`, the keys gathered by the cache), so
the only obstacle is that name check. `allow_qwen_fast()` wraps that one method: a model whose attention
implementation is a name registered by `qwen_fast.register_transformers` keeps it, any other model goes through
transformers' own method unchanged. This is the only transformers method qwen_fast replaces; it relies on the
method's name and on it being called once per manager with the model (transformers 5.23-5.24).
"""

from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

_NAMES: set[str] = set()  # attention implementations registered by qwen_fast


def allow_qwen_fast(name: str) -> None:
    """Let continuous batching keep attention implementation `name` (a qwen_fast registration). Idempotent."""
    _NAMES.add(name)
    method = ContinuousBatchingManager.switch_to_cb_friendly_attn
    if getattr(method, "_qwen_fast_original", None) is not None:
        return

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        if model.config._attn_implementation in _NAMES:
            return  # qwen_fast's attention reads continuous batching's packed rows itself
        method(self, model, auto_switch_to_flash)

    switch_to_cb_friendly_attn._qwen_fast_original = method
    switch_to_cb_friendly_attn.__doc__ = method.__doc__
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn
