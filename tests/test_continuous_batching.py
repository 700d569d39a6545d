"""transformers' continuous batching (`model.generate_batch`) on qwen_fast's kernels, through both routes: the
registered "qwen_fast" attention/experts implementation, and `qwen_fast.patch(model)` (GQAAttention writes and reads
the batching cache's pages itself). Greedy tokens must equal per-prompt greedy `generate`; record_backends proves
which kernels ran. Small pages (4 tokens) and a small token budget make sequences span pages and prefills come in
chunks next to decodes."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import ContinuousBatchingConfig, GenerationConfig

import qwen_fast

NAME = qwen_fast.register_transformers()
PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 2], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [1, 90, 91, 92]]
GREEDY = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
PAGED = ContinuousBatchingConfig(page_size=4, max_batch_tokens=8, num_blocks=64)
# family -> config overrides (Qwen2 with its first layer full attention and the second a window of 4 keys)
FAMILIES = {"qwen3_moe": {}, "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
            "mixtral": {}}  # fmt: skip


def _expected(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), generation_config=GREEDY)[0, len(p) :].tolist() for p in PROMPTS]


def _batched(model) -> tuple[list[list[int]], set[tuple[str, str]]]:
    with qwen_fast.record_backends() as calls:
        out = model.generate_batch(inputs=PROMPTS, generation_config=GREEDY, continuous_batching_config=PAGED)
    by_request = sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
    return [o.generated_tokens for o in by_request], set(calls)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_registered_implementation(family):
    model = tiny_model(family, **FAMILIES[family])
    expected = _expected(model)
    model.set_attn_implementation(NAME)
    if family != "qwen2":
        model.set_experts_implementation(NAME)
    tokens, calls = _batched(model)
    assert tokens == expected
    ops = {op for op, _ in calls}
    assert ("flash_attn_varlen_func", "cpu") in calls and ops <= {"flash_attn_varlen_func", "fused_experts"}
    assert ("fused_experts" in ops) == (family != "qwen2")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2"])
def test_patched_model_reads_the_pages_in_place(family):
    model = tiny_model(family, **FAMILIES[family])
    expected = _expected(model)
    qwen_fast.patch(model)
    tokens, calls = _batched(model)
    assert tokens == expected
    write = "qk_norm_rope_and_cache" if family == "qwen3_moe" else "reshape_and_cache"
    # pages written by the fused op, prefill chunks by the varlen kernel, decode over the pages in place
    assert {(write, "cpu"), ("flash_attn_varlen_func", "cpu"), ("flash_attn_with_kvcache", "cpu")} <= calls
