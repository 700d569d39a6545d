"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k routing, GQA attention with q/k RMSNorm."""

from .family import Family

FAMILY = Family("Qwen3-MoE", "qwen3_moe", moe_block="Qwen3MoeSparseMoeBlock", attention="Qwen3MoeAttention",
                route="module")  # fmt: skip
