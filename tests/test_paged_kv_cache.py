"""qwen_fast.PagedKVCache as a transformers Cache: generate() with it matches DynamicCache (greedy, padded, beam
search, assisted decoding, crop), and its sizing and errors. The compiled step: tests/test_decode_step.py."""

import warnings

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast.cache import OutOfBlocksError

transformers = pytest.importorskip("transformers")
PagedKVCache = qwen_fast.PagedKVCache


VOCAB = 96


def _tiny_model(kind, **overrides):
    """A seeded tiny random model, fp32 on CPU: 2 layers, hidden 64, 4 query and 2 key/value heads of 16."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **overrides
        )
        return transformers.Qwen3MoeForCausalLM(config).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, **overrides)).eval()


def _generate(model, cache, input_ids, **kwargs):
    """Greedy decoding (or beam search); returns (tokens, per-step logits [steps, B, V] when output_logits)."""
    kwargs = dict(max_new_tokens=24, do_sample=False, return_dict_in_generate=True, output_logits=True) | kwargs
    with torch.no_grad():
        out = model.generate(input_ids, cache=cache, **kwargs)
    return out.sequences, None if out.logits is None else torch.stack(out.logits)


@pytest.mark.parametrize(
    "kind, backend, device",
    [
        ("qwen3_moe", "cpu", "cpu"),
        ("qwen3", "torch", "cpu"),
        pytest.param("qwen3_moe", "triton", "cpu", marks=pytest.mark.interpret),
        pytest.param("qwen3_moe", "cuda", "cuda", marks=pytest.mark.gpu),
    ],
)
def test_generate_with_paged_cache_matches_dynamic_cache(kind, backend, device):
    """The pages are written by `backend`'s reshape_and_cache; generate gives DynamicCache's tokens and logits."""
    model = _tiny_model(kind).to(device)
    prompt = torch.randint(VOCAB, (2, 9)).to(device)
    expected_tokens, expected_logits = _generate(model, transformers.DynamicCache(config=model.config), prompt)
    cache = PagedKVCache.for_model(model, max_batch=3, block_size=5)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        tokens, logits = _generate(model, cache, prompt)
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits, torch.float32)
    assert calls == [("reshape_and_cache", backend)] * (
        2 * 24
    )  # one write per layer per forward (prefill + 23 decode steps)
    # 9 + 23 = 32 cached tokens per sequence in 7 pages of 5; row 2 was never used
    assert cache.seq_lens.device == prompt.device and cache.key_caches[0].device == prompt.device
    assert cache.seq_lens.tolist() == [32, 32, 0] and cache.get_seq_length() == 32
    assert [len(cache.sequence_blocks(seq)) for seq in (0, 1)] == [7, 7] and cache.active_sequences() == [0, 1]
    for layer in range(2):  # the pages hold what transformers' own cache holds
        keys, values = cache.gather(layer, 1)
        dynamic = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            model(tokens[:, :-1], cache=dynamic)
        assert_close(keys, dynamic.layers[layer].keys[1].transpose(0, 1), torch.float32)
        assert_close(values, dynamic.layers[layer].values[1].transpose(0, 1), torch.float32)


def test_generate_left_padded_batch_with_attention_mask():
    """Prompts of 4 and 9 tokens, left padded: the pad tokens are cached (as DynamicCache caches them) and the
    attention mask hides them."""
    model = _tiny_model("qwen3_moe")
    prompt = torch.randint(1, VOCAB, (2, 9))
    prompt[0, :5] = 0
    mask = (prompt != 0).long()
    expected_tokens, expected_logits = _generate(model, None, prompt, attention_mask=mask, pad_token_id=0)
    cache = PagedKVCache.for_model(model, max_batch=2, block_size=5)
    tokens, logits = _generate(model, cache, prompt, attention_mask=mask, pad_token_id=0)
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits, torch.float32)
    # The padded prompt alone gives the same continuation as the unpadded one.
    alone, _ = _generate(model, PagedKVCache.for_model(model, max_batch=1, block_size=5), prompt[:1, 5:])
    assert torch.equal(alone[0], tokens[0, 5:])


def test_generate_beam_search_shares_pages_between_beams():
    model = _tiny_model("qwen3")
    prompt = torch.randint(VOCAB, (1, 7))
    kwargs = dict(num_beams=3, max_new_tokens=12, output_logits=False)
    expected, _ = _generate(model, None, prompt, **kwargs)
    cache = PagedKVCache.for_model(model, max_batch=3, block_size=5)
    tokens, _ = _generate(model, cache, prompt, **kwargs)
    assert torch.equal(tokens, expected)
    held = [block for seq in cache.active_sequences() for block in cache.sequence_blocks(seq)]
    assert cache.allocator.num_free == cache.num_blocks - len(set(held))
    assert all(cache.allocator.refcount(block) == held.count(block) for block in set(held))
    assert len(set(held)) < len(held), "no beam shares a page with another: reorder_cache copied instead of sharing"


def test_generate_accepts_past_key_values_and_reset_frees_the_pages():
    model = _tiny_model("qwen3")
    prompt = torch.randint(VOCAB, (2, 6))
    cache = PagedKVCache.for_model(model, max_batch=2, block_size=4, num_blocks=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 renamed past_key_values to cache
        first = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert cache.allocator.num_free == 1  # 2 sequences of 6 + 7 tokens in 4 pages each
    cache.reset()
    assert cache.allocator.num_free == 9 and cache.get_seq_length() == 0 and cache.seq_lens.eq(0).all()
    second = model.generate(prompt, cache=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)


def test_crop_rolls_back_steps_as_dynamic_cache_does():
    """crop(-n) forgets the last n tokens (pages freed); the next forward sees DynamicCache's cropped context."""
    model = _tiny_model("qwen3_moe")
    tokens = torch.randint(VOCAB, (2, 11))
    cache = PagedKVCache.for_model(model, max_batch=2, block_size=4)
    dynamic = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        for kv in (cache, dynamic):
            model(tokens, cache=kv)
            kv.crop(-4)  # 7 tokens left
        assert cache.get_seq_length() == 7 and cache.seq_lens.tolist() == [7, 7]
        assert [len(cache.sequence_blocks(seq)) for seq in (0, 1)] == [2, 2] and cache.allocator.num_free == 64 - 4
        ours = model(tokens[:, 7:10], cache=cache).logits
        expected = model(tokens[:, 7:10], cache=dynamic).logits
    assert_close(ours, expected, torch.float32)
    assert cache.get_seq_length() == 10 and cache.is_croppable
    with pytest.raises(ValueError, match=r"tokens_to_remove must be <= 0 \(crop\(-n\) removes n tokens.*got 3"):
        cache.crop(3)
    cache.crop(-20)  # more than held: empty
    assert cache.get_seq_length() == 0 and cache.allocator.num_free == 64


def test_assisted_generation_with_paged_cache_matches_greedy():
    """Assisted decoding crops the cache after each rejected draft: the tokens are plain greedy decoding's."""
    model, assistant = _tiny_model("qwen3_moe"), _tiny_model("qwen3")
    prompt = torch.randint(VOCAB, (1, 6))
    expected, _ = _generate(model, None, prompt, output_logits=False)
    cache = PagedKVCache.for_model(model, max_batch=1, block_size=4)
    tokens, _ = _generate(model, cache, prompt, output_logits=False, assistant_model=assistant)
    assert torch.equal(tokens, expected)


def test_generate_out_of_blocks_is_a_clear_error():
    model = _tiny_model("qwen3_moe")
    cache = PagedKVCache.for_model(model, max_batch=2, block_size=4, num_blocks=5)  # 2 pages each for the prompts
    with pytest.raises(OutOfBlocksError, match=r"seq 1 needs 1 more to grow from 8 to 9 tokens, 0 free of 5"):
        model.generate(torch.randint(VOCAB, (2, 6)), cache=cache, max_new_tokens=20, do_sample=False)


def test_for_model_sizes_the_cache_from_the_config(monkeypatch):
    model = _tiny_model("qwen3_moe")
    cache = PagedKVCache.for_model(model, max_batch=3, block_size=5)
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.max_seq_len) == (2, 2, 16, 128)
    assert cache.num_blocks == 3 * 26 and cache.block_table.shape == (3, 26) and cache.block_table.dtype == torch.int32
    assert cache.key_caches[0].shape == (78, 5, 2, 16) and cache.key_caches[0].dtype == torch.float32
    assert len(cache.key_caches) == len(cache.value_caches) == 2 and cache.get_max_length() == 128
    page_bytes = 2 * 2 * 5 * 2 * 16 * 4  # keys and values, 2 layers, 5 slots of [2, 16] fp32
    monkeypatch.setattr("qwen_fast.cache.paged_kv_cache.DEFAULT_POOL_BYTES", 10 * page_bytes + 1)
    assert PagedKVCache.for_model(model, max_batch=3, block_size=5).num_blocks == 10
    half = PagedKVCache.for_model(model, max_batch=1, dtype=torch.bfloat16, max_seq_len=40, num_blocks=7)
    assert half.key_caches[1].dtype == torch.bfloat16 and half.num_blocks == 7 and half.block_table.shape == (1, 3)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])  # with layer_types, and without (sliding_window set)
def test_for_model_rejects_sliding_window_layers(kind):
    model = _tiny_model(kind, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match=r"full-attention layers only.*'sliding_attention'"):
        PagedKVCache.for_model(model, max_batch=1)
    with pytest.raises(TypeError, match=r"model must be a transformers model with a .config, got Linear"):
        PagedKVCache.for_model(torch.nn.Linear(2, 2), max_batch=1)


def test_cache_update_bad_input_is_named():
    cache = PagedKVCache(2, 2, 16, max_batch=2, max_seq_len=32, num_blocks=8, block_size=4, dtype=torch.float32)
    states = torch.randn(2, 2, 3, 16)
    with pytest.raises(ValueError, match=r"key_states must be \[B, Hkv, S_new, D\] = \(2, 2, 3, 16\), got"):
        cache.update(torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16), 0)
    with pytest.raises(TypeError, match=r"key_states must be the cache's dtype torch.float32, got torch.float16"):
        cache.update(states.half(), states.half(), 0)
    with pytest.raises(ValueError, match=r"key_states has batch 3 > the cache's max_batch=2"):
        cache.update(torch.randn(3, 2, 3, 16), torch.randn(3, 2, 3, 16), 0)
    with pytest.raises(ValueError, match=r"value_states must be key_states' shape"):
        cache.update(states, states[:, :, :2], 0)
    with pytest.raises(TypeError, match=r"key_states must be a torch.Tensor, got list"):
        cache.update([1.0], states, 0)
    keys, values = cache.update(states, 2 * states, 0)  # a good call after the bad ones
    assert torch.equal(keys, states) and torch.equal(values, 2 * states) and cache.get_seq_length(0) == 3
    with pytest.raises(ValueError, match=r"key_states must be on the cache's device cpu, got meta"):
        cache.update(states.to("meta"), states.to("meta"), 1)
