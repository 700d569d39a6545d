"""Hugging Face transformers hookup: `patch` swaps qwen_fast's modules into a loaded model (one file per family says
what), `register` adds "qwen_fast" to transformers' experts, attention and attention-mask interfaces (imported on
first use: importing qwen_fast does not import transformers)."""

from .patch import FAMILIES, PatchHandle, patch


def __getattr__(name: str):
    if name == "register":
        from .interfaces import register

        return register
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "PatchHandle", "patch", "register"]
