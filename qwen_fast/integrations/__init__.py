"""Hugging Face transformers hookup: `patch` swaps qwen_fast's modules into a loaded model (one file per family says
what), `register` adds "qwen_fast" to transformers' experts, attention and attention-mask interfaces."""

from .interfaces import register
from .patch import FAMILIES, PatchHandle, patch

__all__ = ["FAMILIES", "PatchHandle", "patch", "register"]
