"""OLMoE: softmax top-k routing. Its attention normalizes q and k over all heads at once (not per head) and may clip
q/k/v, so transformers' module stays and attends through the "qwen_fast" attention interface."""

from .family import Family

FAMILY = Family("OLMoE", "olmoe", moe_block="OlmoeSparseMoeBlock", attention="OlmoeAttention", route="interface")
