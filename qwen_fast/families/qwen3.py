"""Qwen3 (dense): GQA attention with per-head q/k RMSNorm; its MLPs are dense, nothing to route."""

from .family import Family

FAMILY = Family("Qwen3", "qwen3", "Qwen3", attention="Qwen3Attention", route="module", tiny=dict(head_dim=16))
