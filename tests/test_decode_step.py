"""The decode step as users run it: transformers' StaticCache through qwen_fast (module swap and attention
implementation), and the compiled step with StaticCache and PagedKVCache, eager reference = unpatched transformers.

Compiled steps use inductor (what `generate(compile_config=...)` and `torch.compile` use by default) where the test
is about the result, and dynamo's eager backend where it only counts graphs and recompiles (the guards are dynamo's,
whatever the backend), to keep the suite's time down."""

import sys

import pytest
import torch
import torch._dynamo.utils
from tiny_models import tiny_model
from transformers import CompileConfig, StaticCache

import qwen_fast
from qwen_fast.nn import GQAAttention

NEW_TOKENS = 66  # crosses 16 page boundaries at block_size 4


def _prompt(batch: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 97, (batch, 6), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if padded:
        mask[batch - 1, :2] = 0  # the last prompt left-padded
    return ids, mask


def _greedy(model, ids, mask, new_tokens=12, **kw) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kw)


def _compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    return config


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after: graph counts are this test's alone."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("route", ["attn_implementation", "patch"])
def test_static_cache_matches_transformers(route, padded):
    """StaticCache returns its whole buffer (unwritten slots last): no attention may read those slots, at prefill or
    decode, with or without padding."""
    model = tiny_model("qwen3_moe")
    ids, mask = _prompt(2, padded)
    expected = _greedy(model, ids, mask)
    if route == "patch":
        qwen_fast.patch(model)
    else:
        model.set_attn_implementation(qwen_fast.register_transformers())
    with qwen_fast.record_backends() as calls:
        assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), expected)
    assert {"flash_attn_varlen_func" if padded else "flash_attn_with_kvcache"} <= {op for op, _ in calls}


def test_static_cache_without_mask_reads_written_slots_only():
    """A direct call without attention_mask (the mask function then returns None): the written slots come from the
    positions, not from the buffer's length."""
    model = tiny_model("qwen3_moe")
    ids, _ = _prompt(2, False)
    with torch.no_grad():
        expected = model(ids).logits
        qwen_fast.patch(model)
        cache = StaticCache(config=model.config, max_cache_len=32)
        first = model(ids[:, :4], cache=cache).logits
        second = model(ids[:, 4:], cache=cache).logits
    torch.testing.assert_close(torch.cat((first, second), dim=1), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("cache", "batch", "padded", "backend"),
    [
        ("static", 2, False, "inductor"),
        ("static", 2, True, "inductor"),
        ("paged", 8, False, "inductor"),
        ("paged", 1, False, "eager"),
        ("paged", 2, True, "eager"),
    ],
)
def test_generate_compiles_the_step_once(cache, batch, padded, backend, fresh_dynamo):
    """generate(compile_config=...) with a patched model: one graph for every decode step, tokens identical."""
    model = tiny_model("qwen3_moe")
    ids, mask = _prompt(batch, padded)
    expected = _greedy(model, ids, mask, NEW_TOKENS)
    qwen_fast.patch(model)
    if cache == "paged":
        kw = {"cache": qwen_fast.PagedKVCache.for_model(model, max_batch=batch, block_size=4)}
        assert kw["cache"].is_compileable
    else:
        kw = {"cache_implementation": "static"}
    out = _greedy(model, ids, mask, NEW_TOKENS, compile_config=_compile_config(backend), **kw)
    assert torch.equal(out, expected)
    # A padded batch on the paged cache compiles its first decode step once more (the prefill's mask, then the
    # steady one); every other setup compiles exactly once.
    assert fresh_dynamo["stats"]["unique_graphs"] == (2 if cache == "paged" and padded else 1)


@pytest.mark.parametrize(
    ("batch", "backend", "mode"),
    [
        (1, "inductor", None),
        (8, "eager", None),
        pytest.param(8, "inductor", "reduce-overhead", marks=pytest.mark.gpu, id="cuda-graphs"),
    ],
)
def test_compiled_decode_loop_never_recompiles(batch, backend, mode, fresh_dynamo):
    """torch.compile(model, fullgraph=True) over a hand-written decode loop on a PagedKVCache, no position_ids
    (the model asks the cache for its length): 64+ steps across page boundaries, no recompile, no graph break; on
    CUDA also captured in CUDA graphs (the plan op stays outside them)."""
    device = "cuda" if mode == "reduce-overhead" else "cpu"
    model = tiny_model("qwen3_moe").to(device)
    ids, _ = _prompt(batch, False)
    ids = ids.to(device)
    expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    qwen_fast.patch(model)
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=batch, block_size=4)
    step = torch.compile(model, fullgraph=True, backend=backend, mode=mode)
    tokens = [ids]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        logits = model(ids, cache=cache).logits  # the prefill, eager
        for _ in range(NEW_TOKENS - 1):
            tokens.append(logits[:, -1:].argmax(-1))
            logits = step(tokens[-1], cache=cache).logits
    tokens.append(logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    assert cache.seq_lens[:batch].tolist() == [ids.shape[1] + NEW_TOKENS - 1] * batch


def test_unpatched_model_cache_is_not_compileable():
    """transformers' own attention reads keys whose length grows every step: generate must not compile there."""
    model = tiny_model("qwen3_moe")
    assert not qwen_fast.PagedKVCache.for_model(model, max_batch=1).is_compileable
    assert qwen_fast.PagedKVCache.for_model(model, max_batch=1, compileable=True).is_compileable


def test_decoder_layer_host_work():
    """One eager decode step of a patched model on a PagedKVCache: a decoder layer after the first makes few qwen_fast
    Python calls (the issue's target: <= 20, and 2 per projection) and its attention runs exactly two ops, the fused
    norm/RoPE/page write and the paged attention, between the q/k/v and o projections (the linear op); the first
    layer adds the step's plan (the allocator), made once per step."""
    model = tiny_model("qwen3_moe", num_hidden_layers=2)
    ids, _ = _prompt(1, False)
    qwen_fast.patch(model)
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=1, block_size=4)
    hidden = torch.randn(1, 1, model.config.hidden_size)
    counted: dict[int, list[str]] = {0: [], 1: []}

    def run_layer(index: int) -> list[tuple[str, str]]:
        def count(frame, event, arg):
            if event == "call" and "/qwen_fast/" in frame.f_code.co_filename:
                counted[index].append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

        with qwen_fast.record_backends() as calls:
            sys.setprofile(count)
            try:
                model.model.layers[index](hidden, position_embeddings=cos_sin, attention_mask=None, cache=cache)
            finally:
                sys.setprofile(None)
        return calls

    with torch.no_grad():
        model(ids, cache=cache)
        cos_sin = model.model.rotary_emb(hidden, torch.tensor([[ids.shape[1]]]))
        run_layer(0)
        calls = run_layer(1)
    assert [op for op, _ in calls] == [
        "linear",  # q, k, v projections (qwen_fast.nn.linear.project: decode rows)
        "linear",
        "linear",
        "qk_norm_rope_and_cache",
        "flash_attn_with_kvcache",
        "linear",  # o projection
        "fused_topk",
        "fused_experts",
    ]
    # The 20, plus two per projection (q, k, v, o: qwen_fast.nn.linear.project and the linear op's entry,
    # which replace nn.Linear's call into ATen).
    assert len(counted[1]) <= 20 + 2 * 4, "\n".join(counted[1])
    assert [name for name in counted[0] if name.endswith(":_plan")] == ["paged_kv_cache.py:_plan"]


def test_plan_is_made_by_layer_zero():
    """Every layer after the first reads layer 0's plan; a layer that runs without one is a clear error, not a write
    into stale slots."""
    model = tiny_model("qwen3_moe")
    qwen_fast.patch(model)
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=1, block_size=4)
    attention = model.model.layers[1].self_attn
    assert isinstance(attention, GQAAttention)
    hidden = torch.randn(1, 1, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(hidden, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="layer 0 plans each step"), torch.no_grad():
        attention(hidden, cos_sin, None, cache=cache)


def test_plan_step_op():
    """The plan op's schema (it mutates exactly the tables it declares) and fake agree with what it does."""
    cache = qwen_fast.PagedKVCache(1, 2, 8, max_batch=2, max_seq_len=64, num_blocks=32, block_size=4,
                                   device="cpu", dtype=torch.float32)  # fmt: skip
    args = (cache._handle, 2, 3, cache._block_table, cache._seq_lens)
    slots = torch.ops.qwen_fast_cache.plan_step(*args)
    assert slots.tolist() == [0, 1, 2, 4, 5, 6] and cache._seq_lens.tolist() == [3, 3]
    torch.library.opcheck(torch.ops.qwen_fast_cache.plan_step, args, test_utils=("test_schema", "test_faketensor"))
