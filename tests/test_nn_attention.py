"""qwen_fast.nn.GQAAttention against transformers' Qwen3 / Qwen3-MoE / Qwen2 / Qwen2-MoE attention, alone and
swapped into tiny random models (greedy generation must give the same tokens)."""

import importlib

import pytest
import torch
import transformers
from numerics import assert_close, assert_within_budget

import qwen_fast
import qwen_fast.families
from qwen_fast.nn.attention import GQAAttention

SMALL = dict(vocab_size=97, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, num_hidden_layers=2, intermediate_size=64)  # fmt: skip
# family -> (config, attention class, rotary class): the families whose attention GQAAttention serves
FAMILIES = {
    f.model_type: (
        lambda f=f, **kw: getattr(transformers, f"{f.prefix}Config")(**{**f.tiny, **SMALL, **kw}),
        getattr(importlib.import_module(f.module), f.attention),
        getattr(importlib.import_module(f.module), f"{f.prefix}RotaryEmbedding"),
    )
    for f in qwen_fast.families.FAMILIES
    if f.route == "module"
}


def _randomize(module: torch.nn.Module) -> None:
    """N(0, 1/fan_in) weights and biases, and RMSNorm weights near 1, so every parameter matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _layer(family: str, dtype: torch.dtype, **config_kw):
    make_config, attention_cls, rotary_cls = FAMILIES[family]
    config = make_config(**config_kw)
    config._attn_implementation = "sdpa"
    hf = attention_cls(config, layer_idx=0)
    _randomize(hf)
    return hf.to(dtype).eval(), rotary_cls(config)


def _inputs(rotary, batch: int, seq: int, dtype: torch.dtype):
    x = torch.randn(batch, seq, SMALL["hidden_size"]).to(dtype)
    positions = torch.arange(seq)[None].expand(batch, -1)
    return x, rotary(x, positions)


def _causal_mask(keep: torch.Tensor, num_q: int, window: int | None = None) -> torch.Tensor:
    """transformers' boolean 4D mask [B, 1, S_q, S_k] for key padding `keep` [B, S_k] (True = attend)."""
    num_k = keep.shape[1]
    q_pos = torch.arange(num_k - num_q, num_k)[:, None]
    k_pos = torch.arange(num_k)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return (visible[None] & keep[:, None, :])[:, None]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_shares_parameters(family):
    hf, _ = _layer(family, torch.float32)
    module = GQAAttention.from_hf(hf)
    ours = dict(module.named_parameters())
    theirs = dict(hf.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[name].data_ptr() == theirs[name].data_ptr() for name in theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_matches_transformers(family, dtype):
    hf, rotary = _layer(family, dtype)
    x, embeddings = _inputs(rotary, batch=2, seq=9, dtype=dtype)
    with torch.no_grad(), qwen_fast.record_backends() as calls:
        out, weights = GQAAttention.from_hf(hf)(x, embeddings, None)
        expected, _ = hf(x, embeddings, None)
    assert weights is None and [op for op, _ in calls] == ["rotary_embedding", "flash_attn_func"]
    if dtype == torch.float32:
        assert_close(out, expected)
    else:
        hf32, _ = _layer(family, torch.float32)
        hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
        with torch.no_grad():
            reference, _ = hf32(x.float(), tuple(e.float() for e in embeddings), None)
        assert_within_budget(out, reference, expected, eps=1e-2)


@pytest.mark.parametrize("mask_kind", ["2d", "4d_bool", "4d_float"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2"])
def test_padding_matches_transformers(family, mask_kind):
    hf, rotary = _layer(family, torch.float32)
    x, embeddings = _inputs(rotary, batch=3, seq=7, dtype=torch.float32)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[2, 5:] = False  # right padding
    mask = _causal_mask(keep, 7)
    if mask_kind == "2d":
        ours_mask = keep.long()
    elif mask_kind == "4d_bool":
        ours_mask = mask
    else:
        ours_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad(), qwen_fast.record_backends() as calls:
        out, _ = GQAAttention.from_hf(hf)(x, embeddings, ours_mask)
        expected, _ = hf(x, embeddings, mask)
    assert [op for op, _ in calls] == ["rotary_embedding", "flash_attn_varlen_func"]
    assert_close(out[keep], expected[keep])
    assert torch.equal(out[~keep], hf.o_proj(torch.zeros(int((~keep).sum()), 8 * 16)))  # padding queries: 0 attention


def test_sliding_window_matches_transformers():
    hf, rotary = _layer("qwen2", torch.float32, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert hf.sliding_window == 4
    x, embeddings = _inputs(rotary, batch=2, seq=11, dtype=torch.float32)
    keep = torch.ones(2, 11, dtype=torch.bool)
    with torch.no_grad():
        out, _ = GQAAttention.from_hf(hf)(x, embeddings, None)
        windowed, _ = GQAAttention.from_hf(hf)(x, embeddings, _causal_mask(keep, 11, window=4))
        expected, _ = hf(x, embeddings, _causal_mask(keep, 11, window=4))
    assert_close(out, expected)
    assert_close(windowed, expected)


@torch.no_grad()
def test_rejects_masks_it_cannot_express():
    hf, rotary = _layer("qwen3", torch.float32)
    x, embeddings = _inputs(rotary, batch=1, seq=5, dtype=torch.float32)
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)  # bidirectional: not causal
    with pytest.raises(ValueError, match="causal attention masks with key padding only"):
        GQAAttention.from_hf(hf)(x, embeddings, full)
    with pytest.raises(ValueError, match=r"attention_mask must be 2D \[B, S_k\] or 4D"):
        GQAAttention.from_hf(hf)(x, embeddings, torch.ones(1, 5, 5))
    with pytest.raises(TypeError, match="GQAAttention.from_hf does not support .*Linear; supported .*Qwen3Attention"):
        GQAAttention.from_hf(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        GQAAttention(64, 6, 4, 16)


def test_constructed_module_matches_from_hf():
    hf, rotary = _layer("qwen3", torch.float32)
    module = GQAAttention(64, 8, 2, 16, qk_norm=True, rms_norm_eps=hf.q_norm.variance_epsilon)
    module.load_state_dict(hf.state_dict())
    x, embeddings = _inputs(rotary, batch=2, seq=6, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(module(x, embeddings)[0], GQAAttention.from_hf(hf)(x, embeddings)[0])


def test_compiles_fullgraph():
    hf, rotary = _layer("qwen3_moe", torch.float32)
    module = GQAAttention.from_hf(hf)
    x, embeddings = _inputs(rotary, batch=2, seq=6, dtype=torch.float32)
    with torch.no_grad():
        compiled = torch.compile(module, fullgraph=True, backend="eager")
        assert_close(compiled(x, embeddings, None)[0], module(x, embeddings, None)[0])


def swap_attention(model: torch.nn.Module, flash_masks: bool = False) -> None:
    """GQAAttention in every layer; flash_masks: also the "qwen_fast" mask implementation (None without padding, else
    2D key padding), as qwen_fast.patch sets it; else the model keeps sdpa's 4D masks."""
    for layer in model.model.layers:
        layer.self_attn = GQAAttention.from_hf(layer.self_attn)
    if flash_masks:
        model.set_attn_implementation(qwen_fast.register_transformers())


MODELS = {family: (lambda family=family: _model(family)) for family in FAMILIES}


def _model(family: str) -> torch.nn.Module:
    prefix = next(f.prefix for f in qwen_fast.families.FAMILIES if f.model_type == family)
    return getattr(transformers, f"{prefix}ForCausalLM")(FAMILIES[family][0]())


@pytest.mark.parametrize("family", list(MODELS))
def test_generate_matches_transformers(family):
    model = MODELS[family]().eval()
    prompt = torch.randint(SMALL["vocab_size"], (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left-padded second prompt
    padded = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
    unpadded = model.generate(prompt, max_new_tokens=12, do_sample=False)
    swap_attention(model)
    with qwen_fast.record_backends() as calls:
        assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False), padded)
    # "linear": the q/k/v/o projections of the decode steps (2 rows; the prefill's 12 rows too)
    assert {op for op, _ in calls} == {"linear", "rotary_embedding", "flash_attn_varlen_func"}
    with qwen_fast.record_backends() as calls:
        assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), unpadded)
    # the prefill over its own rows; each decode step over the keys its positions say are written
    assert {op for op, _ in calls} == {"linear", "rotary_embedding", "flash_attn_func", "flash_attn_with_kvcache"}


@pytest.mark.parametrize(("family", "block_size"), [("qwen3_moe", 1), ("qwen3_moe", 5), ("qwen2", 5)])
def test_generate_with_paged_cache_reads_pages(family, block_size):
    model = MODELS[family]().eval()
    prompt = torch.randint(SMALL["vocab_size"], (2, 6))
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    padded = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
    swap_attention(model, flash_masks=True)
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=2, block_size=block_size)
    with qwen_fast.record_backends() as calls:
        assert torch.equal(model.generate(prompt, cache=cache, max_new_tokens=12, do_sample=False), expected)
    # one pass for q/k norm + RoPE + cache write, then attention over the pages in place (no gather); the prefill
    # into the empty cache attends over its own rows
    fused = {"qk_norm_rope_and_cache"} if family == "qwen3_moe" else {"rotary_embedding", "reshape_and_cache"}
    assert {op for op, _ in calls} == fused | {"linear", "flash_attn_func", "flash_attn_with_kvcache"}
    assert calls.count(("flash_attn_func", calls[-1][1])) == len(model.model.layers)  # the prefill only
    assert cache.seq_lens[:2].tolist() == [17, 17]  # 6 + 12 tokens, the last one never fed back
    # A padded batch takes the gathering path (Cache.update) and varlen attention, still on the pages.
    cache = qwen_fast.PagedKVCache.for_model(model, max_batch=2, block_size=block_size)
    with qwen_fast.record_backends() as calls:
        out = model.generate(prompt, attention_mask=mask, cache=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, padded)
    assert {op for op, _ in calls} == {"linear", "rotary_embedding", "reshape_and_cache", "flash_attn_varlen_func"}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2"])
def test_chunked_prefill_on_paged_cache(family):
    """A second multi-token chunk attends over the pages (the first chunk's keys included), not just its own rows."""
    model = MODELS[family]().eval()
    ids = torch.randint(SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        swap_attention(model, flash_masks=True)
        cache = qwen_fast.PagedKVCache.for_model(model, max_batch=2, block_size=4)
        first = model(ids[:, :5], cache=cache).logits
        with qwen_fast.record_backends() as calls:
            second = model(ids[:, 5:], cache=cache).logits
    assert_close(torch.cat((first, second), dim=1), expected)
    assert "flash_attn_with_kvcache" in {op for op, _ in calls} and "flash_attn_func" not in {op for op, _ in calls}
