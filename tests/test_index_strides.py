"""Regression tests for tensors read as if contiguous (issue 10): the kernels honour the strides of the stride-0
positions that GQAAttention builds for a batch at decode, of an expanded cache_seqlens, of a column-strided block
table, and of a value cache laid out unlike the key cache. The op harness feeds every op such inputs; these pin the
bugs that were found, on the kernel backends."""

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast import reference

KERNEL_BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.interpret)]


def _run(backend, op, *args, **kwargs):
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out = op(*args, **kwargs)
    assert calls[0] == (op.__name__, backend)
    return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rotary_embedding_reads_stride0_positions(backend):
    """[1, S] positions expanded to a batch of decode rows: one stride-0 [B] view (GQAAttention at S = 1)."""
    batch, heads_q, heads_kv, head_dim = 4, 4, 2, 16
    positions = torch.tensor([[37]]).expand(batch, 1).reshape(-1)
    assert positions.stride() == (0,)
    table = reference.compute_cos_sin_cache(head_dim, 64, 1e4)
    query, key = torch.randn(batch, heads_q, head_dim), torch.randn(batch, heads_kv, head_dim)
    got = _run(backend, qwen_fast.rotary_embedding, positions, query, key, table)
    want = reference.rotary_embedding(positions.contiguous(), query, key, table)
    for actual, expected in zip(got, want, strict=True):
        assert_close(actual, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_qk_norm_rope_and_cache_reads_strided_positions_and_slots(backend):
    num_tokens, heads_q, heads_kv, head_dim, block_size = 5, 4, 2, 16, 4
    positions = torch.tensor([9]).expand(num_tokens)
    slots = torch.tensor([6, 0, -1, 0, 13, 0, 2, 0, 8, 0])[::2]
    table = reference.compute_cos_sin_cache(head_dim, 64, 1e4)
    query = torch.randn(num_tokens, heads_q, head_dim)
    key, value = torch.randn(num_tokens, heads_kv, head_dim), torch.randn(num_tokens, heads_kv, head_dim)
    q_weight, k_weight = torch.randn(head_dim), torch.randn(head_dim)
    caches = {name: torch.zeros(2, 4, block_size, heads_kv, head_dim) for name in ("got", "want")}
    got = _run(backend, qwen_fast.qk_norm_rope_and_cache, query, key, value, q_weight, k_weight, 1e-6, positions,
               table, *caches["got"], slots)  # fmt: skip
    want = reference.qk_norm_rope_and_cache(query, key, value, q_weight, k_weight, 1e-6, positions.contiguous(),
                                            table, *caches["want"], slots.contiguous())  # fmt: skip
    for actual, expected in zip((*got, caches["got"]), (*want, caches["want"]), strict=True):
        assert_close(actual, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seqlens_layout", ["expanded", "strided"])
@pytest.mark.parametrize("table_layout", ["column_strided", "transposed"])
def test_flash_attn_with_kvcache_reads_strided_seqlens_and_block_table(backend, seqlens_layout, table_layout):
    batch, seqlen_q, heads_q, heads_kv, head_dim, block_size, num_blocks = 3, 1, 4, 2, 16, 4, 12
    pages = torch.randperm(num_blocks).int()
    if table_layout == "column_strided":  # every other column of a wider table
        block_table = pages.view(batch, 4).repeat_interleave(2, dim=1)[:, ::2]
    else:  # a [max_blocks, B] table seen as [B, max_blocks]
        block_table = pages.view(4, batch).t()
    if seqlens_layout == "expanded":
        cache_seqlens = torch.tensor([13], dtype=torch.int32).expand(batch)
    else:
        cache_seqlens = torch.tensor([5, 99, 16, 99, 9, 99], dtype=torch.int32)[::2]
    k_cache = torch.randn(num_blocks, block_size, heads_kv, head_dim)
    v_cache = torch.randn(num_blocks, block_size, heads_kv, head_dim)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim)
    got = _run(backend, qwen_fast.flash_attn_with_kvcache, q, k_cache, v_cache, cache_seqlens=cache_seqlens,
               block_table=block_table)  # fmt: skip
    want = reference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens.contiguous(),
                                             block_table=block_table.contiguous())  # fmt: skip
    assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_flash_attn_with_kvcache_appends_to_caches_of_different_strides(backend):
    """New k/v go to a key cache and a value cache with different strides (the value cache a view of a wider buffer);
    the Triton append used to write the values through the key cache's strides."""
    batch, heads_kv, head_dim, block_size, num_blocks = 2, 2, 16, 4, 6
    block_table = torch.arange(num_blocks, dtype=torch.int32).view(batch, 3)
    cache_seqlens = torch.tensor([3, 7], dtype=torch.int32)
    q, k, v = (
        torch.randn(batch, 1, 4, head_dim),
        torch.randn(batch, 1, heads_kv, head_dim),
        torch.randn(batch, 1, heads_kv, head_dim),
    )
    k_cache = torch.randn(num_blocks, block_size, heads_kv, head_dim)
    v_wide = torch.randn(num_blocks, block_size, heads_kv, 2 * head_dim)
    want_k, want_v = k_cache.clone(), v_wide[..., :head_dim].clone()
    want = reference.flash_attn_with_kvcache(q, want_k, want_v, k, v, cache_seqlens, block_table)
    v_cache = v_wide[..., :head_dim]
    got = _run(backend, qwen_fast.flash_attn_with_kvcache, q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    assert_close(got, want)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
