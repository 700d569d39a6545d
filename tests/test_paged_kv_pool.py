"""qwen_fast.cache without transformers: BlockAllocator (free list, reference counts) and PagedKVPool (pages, block
tables, fork and copy-on-write), checked against plain concatenation of what was appended."""

import random
import subprocess
import sys

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast.cache import BlockAllocator, OutOfBlocksError, PagedKVPool
from qwen_fast.reference.attention import flash_attn_func

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
        cache_seqlens=pool.seq_lens[seqs] - 1, block_table=pool.block_table[seqs], causal=True,
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


def test_import_qwen_fast_does_not_import_transformers():
    code = "import sys, qwen_fast, qwen_fast.cache; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-P", "-c", code], check=False).returncode == 0  # -P: the installed copy
