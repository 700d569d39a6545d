"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax top-k routing plus a sigmoid-gated shared expert; GQA attention
with q/k/v biases."""

from .family import Family

FAMILY = Family("Qwen2-MoE", "qwen2_moe", moe_block="Qwen2MoeSparseMoeBlock", attention="Qwen2MoeAttention",
                route="module")  # fmt: skip
