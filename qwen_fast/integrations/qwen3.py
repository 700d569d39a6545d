"""Qwen3 (dense): GQA attention with q/k RMSNorm; its MLPs are dense, nothing to route."""

from .family import Family

FAMILY = Family("Qwen3", "qwen3", moe_block=None, attention="Qwen3Attention", route="module")
