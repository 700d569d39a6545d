"""qwen_fast.cache: BlockAllocator, PagedKVPool and PagedKVCache (the transformers Cache), checked against plain
concatenation of what was appended and against transformers' DynamicCache."""

import doctest
import importlib
import random
import subprocess
import sys
import warnings

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast.cache import BlockAllocator, OutOfBlocksError, PagedKVPool
from qwen_fast.reference.attention import flash_attn_func

transformers = pytest.importorskip("transformers")
PagedKVCache = qwen_fast.PagedKVCache


# -- BlockAllocator --------------------------------------------------------------------------------------------------


def test_allocator_allocates_distinct_blocks_and_frees_them():
    allocator = BlockAllocator(6)
    a, b = allocator.allocate(2), allocator.allocate(3)
    assert len(set(a + b)) == 5 and all(0 <= block < 6 for block in a + b)
    assert allocator.num_free == 1 and all(allocator.refcount(block) == 1 for block in a + b)
    allocator.free(a)
    assert allocator.num_free == 3 and all(allocator.refcount(block) == 0 for block in a)
    c = allocator.allocate(3)  # the freed blocks are handed out again
    assert set(a) <= set(c) and not set(c) & set(b)
    assert allocator.allocate(0) == []


def test_allocator_shared_block_returns_to_the_free_list_at_refcount_zero():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.share(blocks)
    allocator.share(blocks[:1])
    assert [allocator.refcount(block) for block in blocks] == [3, 2]
    allocator.free(blocks)
    assert [allocator.refcount(block) for block in blocks] == [2, 1] and allocator.num_free == 2
    allocator.free(blocks)
    assert [allocator.refcount(block) for block in blocks] == [1, 0] and allocator.num_free == 3
    allocator.free(blocks[:1])
    assert allocator.num_free == 4


def test_allocator_make_writable_replaces_only_shared_blocks():
    allocator = BlockAllocator(8)
    parent = allocator.allocate(3)
    child = list(parent)
    allocator.share(child)
    allocator.free(parent[2:])  # the parent gave up its last block: the child alone holds it
    pairs = allocator.make_writable(child, [0, 2])
    assert len(pairs) == 1 and pairs[0][0] == parent[0] and child[0] == pairs[0][1] not in parent
    assert child[1:] == parent[1:]  # block 1 not asked for, block 2 not shared: both kept
    assert allocator.refcount(parent[0]) == 1 and allocator.refcount(child[0]) == 1


def test_allocator_exhaustion_names_asked_free_and_total_and_changes_nothing():
    allocator = BlockAllocator(4)
    allocator.allocate(3)
    with pytest.raises(OutOfBlocksError, match=r"asked for 2, 1 free of 4"):
        allocator.allocate(2)
    assert allocator.num_free == 1
    shared = allocator.allocate(1)
    allocator.share(shared)
    table = shared + []
    with pytest.raises(OutOfBlocksError, match=r"asked for 1, 0 free of 4"):
        allocator.make_writable(table, [0])
    assert table == shared and allocator.refcount(shared[0]) == 2


def test_allocator_double_free_and_bad_ids_are_named_errors():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.free(blocks[:1])
    with pytest.raises(ValueError, match=rf"cannot free block {blocks[0]} 1 times: it is already free"):
        allocator.free(blocks)
    assert allocator.refcount(blocks[1]) == 1  # the valid block in the same call was not freed either
    with pytest.raises(ValueError, match=rf"cannot free block {blocks[1]} 2 times: it is referenced 1 times"):
        allocator.free([blocks[1], blocks[1]])
    with pytest.raises(ValueError, match=r"cannot share block .*: it is free"):
        allocator.share(blocks[:1])
    with pytest.raises(ValueError, match=r"block must be in \[0, 3\], got 4"):
        allocator.free([4])
    with pytest.raises(TypeError, match=r"block must be an int"):
        allocator.refcount(1.0)
    with pytest.raises(ValueError, match=r"n must be in \[0, inf\], got -1"):
        allocator.allocate(-1)
    with pytest.raises(ValueError, match=r"num_blocks must be in \[1, inf\], got 0"):
        BlockAllocator(0)


# -- PagedKVPool -----------------------------------------------------------------------------------------------------

HEADS_KV, HEAD_DIM = 2, 8


def _pool(block_size, num_blocks=64, max_batch=4, num_layers=2, max_seq_len=200):
    return PagedKVPool(
        num_layers, HEADS_KV, HEAD_DIM, max_batch, max_seq_len, num_blocks, block_size, "cpu", torch.float32
    )


def _read_with_block_table(pool, layer, seq):
    """Sequence seq's keys and values read slot by slot through the device block_table and seq_lens (independent of
    the pool's own gather)."""
    table, length = pool.block_table[seq], int(pool.seq_lens[seq])
    keys = [pool.key_caches[layer][table[p // pool.block_size], p % pool.block_size] for p in range(length)]
    values = [pool.value_caches[layer][table[p // pool.block_size], p % pool.block_size] for p in range(length)]
    empty = torch.empty(0, HEADS_KV, HEAD_DIM)
    return (torch.stack(keys), torch.stack(values)) if length else (empty, empty)


def _append_random(pool, seq, num_tokens, appended):
    """Append num_tokens random tokens to seq in every layer; record them in appended[seq][layer]."""
    slots = pool.append(seq, num_tokens)
    for layer in range(pool.num_layers):
        key, value = torch.randn(num_tokens, HEADS_KV, HEAD_DIM), torch.randn(num_tokens, HEADS_KV, HEAD_DIM)
        pool.write(layer, key, value, slots)
        appended[seq][layer].append((key, value))


def _assert_holds(pool, seq, chunks):
    """seq's pages hold exactly the concatenation of chunks[layer] (a list of (key, value)), in every layer."""
    for layer in range(pool.num_layers):
        expected_keys = torch.cat([key for key, _ in chunks[layer]] or [torch.empty(0, HEADS_KV, HEAD_DIM)])
        expected_values = torch.cat([value for _, value in chunks[layer]] or [torch.empty(0, HEADS_KV, HEAD_DIM)])
        for keys, values in (_read_with_block_table(pool, layer, seq), pool.gather(layer, seq)):
            assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_pool_random_appends_read_back_as_concatenation_with_less_than_one_block_wasted(block_size):
    pool = _pool(block_size, num_blocks=200 // block_size + 40)
    appended = {}
    for step in range(40):
        active = pool.active_sequences()
        if len(active) < pool.max_batch and random.random() < 0.3:
            seq = pool.add_sequence()
            appended[seq] = {layer: [] for layer in range(pool.num_layers)}
        elif active and random.random() < 0.1:
            seq = random.choice(active)
            pool.free(seq)
            del appended[seq]
        elif active:
            seq = random.choice(active)
            _append_random(pool, seq, random.randint(0, 9), appended)
        held = [block for seq in pool.active_sequences() for block in pool.sequence_blocks(seq)]
        assert len(held) == len(set(held)), f"step {step}: two sequences hold the same block without a fork"
        assert pool.allocator.num_free == pool.num_blocks - len(held)
    assert appended, "the random walk ended with no sequence"
    for seq, chunks in appended.items():
        length = pool.sequence_length(seq)
        assert length == sum(key.shape[0] for key, _ in chunks[0])
        assert len(pool.sequence_blocks(seq)) == -(-length // block_size)  # so less than one block is wasted
        assert pool.block_table[seq, len(pool.sequence_blocks(seq)) :].eq(0).all()
        _assert_holds(pool, seq, chunks)


@pytest.mark.parametrize("block_size, prefix", [(5, 7), (5, 10), (1, 3), (16, 3)])
def test_fork_shares_pages_and_copies_on_write(block_size, prefix):
    pool = _pool(block_size)
    parent = pool.add_sequence()
    appended = {parent: {layer: [] for layer in range(pool.num_layers)}}
    _append_random(pool, parent, prefix, appended)
    parent_blocks = pool.sequence_blocks(parent)
    pages_before = [cache[parent_blocks].clone() for cache in pool.key_caches + pool.value_caches]

    child = pool.fork(parent)
    assert pool.sequence_blocks(child) == parent_blocks and pool.sequence_length(child) == prefix
    assert all(pool.allocator.refcount(block) == 2 for block in parent_blocks)
    appended[child] = {layer: list(chunks) for layer, chunks in appended[parent].items()}
    _append_random(pool, child, 4, appended)

    partial = prefix % block_size != 0  # the child wrote into the shared last page: it must have got a copy
    child_blocks = pool.sequence_blocks(child)
    full = prefix // block_size
    assert child_blocks[:full] == parent_blocks[:full]
    assert (child_blocks[full] not in parent_blocks) if partial else len(child_blocks) > len(parent_blocks)
    for cache, before in zip(pool.key_caches + pool.value_caches, pages_before, strict=True):
        assert torch.equal(cache[parent_blocks], before), "the child's write changed the parent's pages"
    _assert_holds(pool, parent, appended[parent])
    _assert_holds(pool, child, appended[child])

    # The parent now holds its last page alone: it writes in place, without a copy.
    free_before = pool.allocator.num_free
    _append_random(pool, parent, 1, appended)
    assert pool.sequence_blocks(parent)[: len(parent_blocks)] == parent_blocks
    assert pool.allocator.num_free == free_before - (len(pool.sequence_blocks(parent)) - len(parent_blocks))
    _assert_holds(pool, parent, appended[parent])
    _assert_holds(pool, child, appended[child])
    pool.free(parent)
    pool.free(child)
    assert pool.allocator.num_free == pool.num_blocks


@pytest.mark.parametrize("block_size", [1, 5])
def test_truncate_drops_the_tail_and_releases_pages_a_fork_does_not_share(block_size):
    pool = _pool(block_size)
    parent = pool.add_sequence()
    appended = {parent: {layer: [] for layer in range(pool.num_layers)}}
    _append_random(pool, parent, 12, appended)
    child = pool.fork(parent)
    appended[child] = {layer: list(chunks) for layer, chunks in appended[parent].items()}
    _append_random(pool, child, 6, appended)  # 18 tokens, its pages past the shared ones are its own
    shared = pool.sequence_blocks(parent)
    own = [block for block in pool.sequence_blocks(child) if block not in shared]
    free_before = pool.allocator.num_free

    pool.truncate(child, 7)  # back inside the shared pages: its own pages return to the free list
    assert pool.sequence_length(child) == 7 and pool.seq_lens[child] == 7
    assert pool.sequence_blocks(child) == shared[: -(-7 // block_size)]
    assert pool.allocator.num_free == free_before + len(own) and all(pool.allocator.refcount(b) == 0 for b in own)
    assert pool.block_table[child, len(pool.sequence_blocks(child)) :].eq(0).all()
    keys = [torch.cat([key for key, _ in appended[child][layer]])[:7] for layer in range(pool.num_layers)]
    values = [torch.cat([value for _, value in appended[child][layer]])[:7] for layer in range(pool.num_layers)]
    appended[child] = {layer: [(keys[layer], values[layer])] for layer in range(pool.num_layers)}
    _assert_holds(pool, child, appended[child])
    _append_random(pool, child, 3, appended)  # writes after the cut: into a copy where the page is shared
    _assert_holds(pool, child, appended[child])
    _assert_holds(pool, parent, appended[parent])
    with pytest.raises(ValueError, match=r"length must be in \[0, 10\], got 11"):
        pool.truncate(child, 11)
    pool.truncate(child, 0)
    pool.free(parent)
    assert pool.sequence_blocks(child) == [] and pool.allocator.num_free == pool.num_blocks


def test_pool_out_of_blocks_is_an_error_that_changes_nothing():
    pool = _pool(block_size=4, num_blocks=3)
    seq = pool.add_sequence()
    pool.append(seq, 10)
    with pytest.raises(OutOfBlocksError, match=r"seq 0 needs 1 more to grow from 10 to 13 tokens, 0 free of 3"):
        pool.append(seq, 3)
    assert pool.sequence_length(seq) == 10 and pool.seq_lens[seq] == 10 and len(pool.sequence_blocks(seq)) == 3
    child = pool.fork(seq)  # shares the partially filled last page: writing there needs a free page for the copy
    with pytest.raises(OutOfBlocksError, match=rf"seq {child} needs 1 more to grow from 10 to 11 tokens, 0 free"):
        pool.append(child, 1)
    assert pool.sequence_blocks(child) == pool.sequence_blocks(seq) and pool.sequence_length(child) == 10
    assert all(pool.allocator.refcount(block) == 2 for block in pool.sequence_blocks(seq))
    pool.free(seq)
    pool.append(child, 2)  # sole owner now: written in place
    assert pool.allocator.num_free == 0 and pool.sequence_length(child) == 12


def test_pool_block_table_feeds_flash_attn_with_kvcache():
    """Decode one token per sequence with the pool's block_table and seq_lens: flash_attn_with_kvcache over the pages
    equals attention over the concatenated keys."""
    pool = _pool(block_size=5)
    lengths = [3, 11, 0]
    appended = {}
    for length in lengths:
        seq = pool.add_sequence()
        appended[seq] = {layer: [] for layer in range(pool.num_layers)}
        _append_random(pool, seq, length, appended)
    seqs = pool.active_sequences()
    for seq in seqs:
        pool.reserve(seq, 1)  # room for the new token, written by flash_attn_with_kvcache itself
    q = torch.randn(len(seqs), 1, 4, HEAD_DIM)
    k_new, v_new = torch.randn(len(seqs), 1, HEADS_KV, HEAD_DIM), torch.randn(len(seqs), 1, HEADS_KV, HEAD_DIM)
    out = qwen_fast.flash_attn_with_kvcache(
        q, pool.key_caches[1], pool.value_caches[1], k_new, v_new,
        cache_seqlens=pool.seq_lens[seqs] - 1, block_table=pool.block_table[seqs],
    )  # fmt: skip
    for row, seq in enumerate(seqs):
        keys = torch.cat([key for key, _ in appended[seq][1]] + [k_new[row]])
        values = torch.cat([value for _, value in appended[seq][1]] + [v_new[row]])
        expected = flash_attn_func(q[row : row + 1], keys[None], values[None], causal=True)
        assert_close(out[row : row + 1], expected, torch.float32)


def test_pool_bad_input_is_named():
    pool = _pool(block_size=4, max_batch=2, max_seq_len=10)
    with pytest.raises(ValueError, match=r"seq must be in \[0, 1\], got 2"):
        pool.append(2, 1)
    with pytest.raises(ValueError, match=r"seq 0 is not an active sequence"):
        pool.append(0, 1)
    seq = pool.add_sequence()
    pool.add_sequence()
    with pytest.raises(ValueError, match=r"all max_batch=2 sequence ids are in use"):
        pool.add_sequence()
    with pytest.raises(ValueError, match=r"seq 0 would hold 11 tokens, past max_seq_len=10"):
        pool.append(seq, 11)
    with pytest.raises(ValueError, match=r"num_tokens must be in \[0, inf\], got -1"):
        pool.append(seq, -1)
    slots = pool.append(seq, 2)
    with pytest.raises(ValueError, match=r"end must be in \[0, 2\], got 3"):
        pool.slot_mapping(seq, 0, 3)
    with pytest.raises(TypeError, match=r"key must be float32, got torch.float16"):
        pool.write(0, torch.randn(2, HEADS_KV, HEAD_DIM).half(), torch.randn(2, HEADS_KV, HEAD_DIM).half(), slots)
    with pytest.raises(ValueError, match=r"key must be \[N, Hkv, D\] = \(2, 2, 8\), got \(2, 3, 8\)"):
        pool.write(0, torch.randn(2, 3, HEAD_DIM), torch.randn(2, 3, HEAD_DIM), slots)
    with pytest.raises(ValueError, match=r"key must be on cpu like the other inputs, got meta"):
        pool.write(0, torch.randn(2, HEADS_KV, HEAD_DIM, device="meta"), torch.randn(2, HEADS_KV, HEAD_DIM), slots)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\], got 2"):
        pool.write(2, torch.randn(2, HEADS_KV, HEAD_DIM), torch.randn(2, HEADS_KV, HEAD_DIM), slots)
    with pytest.raises(TypeError, match=r"dtype must be float32, float16 or bfloat16, got torch.int32"):
        PagedKVPool(1, HEADS_KV, HEAD_DIM, 1, 8, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_size must be in \[1, inf\], got 0"):
        PagedKVPool(1, HEADS_KV, HEAD_DIM, 1, 8, 4, block_size=0)
    pool.free(seq)
    with pytest.raises(ValueError, match=r"seq 0 is not an active sequence"):
        pool.free(seq)


# -- PagedKVCache with transformers generate() -----------------------------------------------------------------------

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


def test_import_qwen_fast_does_not_import_transformers():
    code = "import sys, qwen_fast, qwen_fast.cache; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-P", "-c", code], check=False).returncode == 0  # -P: the installed copy


@pytest.mark.parametrize("name", ["block_allocator", "paged_kv_pool", "paged_kv_cache"])
def test_docstring_examples(name):
    module = importlib.import_module(f"qwen_fast.cache.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch, "qwen_fast": qwen_fast}, verbose=False)
    assert result.failed == 0 and result.attempted > 0
