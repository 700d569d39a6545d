"""Qwen2 / Qwen2.5 (dense): GQA attention with q/k/v biases; its MLPs are dense, nothing to route."""

from .family import Family

FAMILY = Family("Qwen2", "qwen2", "Qwen2", attention="Qwen2Attention", route="module")
