"""Mixtral: softmax top-k routing that always renormalizes (fp32 weights). Its attention is plain GQA, served through
the "qwen_fast" attention interface (transformers keeps the projections and RoPE)."""

from .family import Family

FAMILY = Family("Mixtral", "mixtral", moe_block="MixtralSparseMoeBlock", attention="MixtralAttention",
                route="interface")  # fmt: skip
