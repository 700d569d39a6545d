"""qwen_fast.reference.kv_cache: cache writes slot by slot, and attention over paged / contiguous caches."""

import pytest
import torch
from numerics import assert_close, assert_within_budget

import qwen_fast
from qwen_fast.cli import selftest
from qwen_fast.cli.samples import SPECS, Inputs
from qwen_fast.ops.kvcache_checks import BlockTableTooSmallError
from qwen_fast.reference.attention import flash_attn_func
from qwen_fast.reference.kv_cache import flash_attn_with_kvcache, reshape_and_cache

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97])
def test_reshape_and_cache_writes_slots_and_skips_negative(num_tokens, block_size, dtype):
    num_blocks, heads_kv, head_dim = 101, 2, 64
    key_cache = torch.randn(num_blocks, block_size, heads_kv, head_dim).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, heads_kv, head_dim).to(dtype)
    key_before, value_before = key_cache.clone(), value_cache.clone()
    key = torch.randn(num_tokens, heads_kv, head_dim).to(dtype)
    value = torch.randn(num_tokens, heads_kv, head_dim).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::3] = -1  # padding tokens

    reshape_and_cache(key, value, key_cache, value_cache, slots)

    expected_key, expected_value = key_before.clone(), value_before.clone()
    for n, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_key[slot // block_size, slot % block_size] = key[n]
            expected_value[slot // block_size, slot % block_size] = value[n]
    assert torch.equal(key_cache, expected_key) and torch.equal(value_cache, expected_value)
    if num_tokens > 0:  # the padding tokens' rows were not written anywhere
        assert not (key_cache.flatten(0, 1) == key[0]).all(dim=(1, 2)).any()


def _make_cache(paged, seqlens_total, batch, block_size, heads_kv, head_dim, dtype):
    """Random caches and (when paged) a shuffled block table with room for every sequence's final length."""
    if not paged:
        s_max = max(seqlens_total) + 3
        shape = (batch, s_max, heads_kv, head_dim)
        return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), None
    blocks_per_seq = max(-(-n // block_size) for n in seqlens_total) + 1
    num_blocks = batch * blocks_per_seq + 2
    block_table = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq).int()
    shape = (num_blocks, block_size, heads_kv, head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), block_table


def _slot(block_table, block_size, b, p):
    """(page, row) of position p of sequence b; a contiguous cache is page b."""
    if block_table is None:
        return b, p
    return int(block_table[b, p // block_size]), p % block_size


def _read_sequence(cache, block_table, block_size, b, length):
    """[length, Hkv, D]: positions 0 .. length - 1 of sequence b, read one slot at a time."""
    rows = [cache[_slot(block_table, block_size, b, p)] for p in range(length)]
    return torch.stack(rows) if rows else cache.new_empty(0, *cache.shape[2:])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("heads_q, heads_kv, window_size", [(4, 4, (-1, -1)), (8, 1, (6, 0))])
@pytest.mark.parametrize("num_new", [0, 1, 7])
@pytest.mark.parametrize("paged, block_size", [(False, None), (True, 1), (True, 5), (True, 16)])
def test_with_kvcache_matches_flash_attn_over_gathered_keys(
    paged, block_size, num_new, heads_q, heads_kv, window_size, dtype
):
    # With new keys the queries are the new tokens; without, 3 queries read the cache (the first rows of short
    # sequences, and all of the empty one's, see no key and give 0).
    batch, head_dim, seqlen_q = 4, 64, num_new or 3
    cache_seqlens = torch.tensor([0, 1, 40, 97], dtype=torch.int32)
    totals = [n + num_new for n in cache_seqlens.tolist()]
    k_cache, v_cache, block_table = _make_cache(paged, totals, batch, block_size, heads_kv, head_dim, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, seqlen_q, heads_q, head_dim).to(dtype)
    k_new = torch.randn(batch, num_new, heads_kv, head_dim).to(dtype) if num_new else None
    v_new = torch.randn(batch, num_new, heads_kv, head_dim).to(dtype) if num_new else None

    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=True, window_size=window_size,
    )  # fmt: skip

    expected_k_cache, expected_v_cache = k_before.clone(), v_before.clone()
    for b in range(batch):
        old = cache_seqlens[b].item()
        for i in range(num_new):  # the new tokens land at positions old .. old + num_new - 1
            page, row = _slot(block_table, block_size, b, old + i)
            expected_k_cache[page, row], expected_v_cache[page, row] = k_new[b, i], v_new[b, i]
        # the keys of sequence b, read position by position from the updated cache
        keys = _read_sequence(expected_k_cache, block_table, block_size, b, totals[b])
        values = _read_sequence(expected_v_cache, block_table, block_size, b, totals[b])
        expected = flash_attn_func(q[b : b + 1], keys[None], values[None], causal=True, window_size=window_size)
        assert_close(out[b : b + 1], expected)
    assert torch.equal(k_cache, expected_k_cache) and torch.equal(v_cache, expected_v_cache)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_with_kvcache_int_and_none_seqlens(block_size):
    """cache_seqlens as an int, and None (the whole cache, all block_table pages, is valid)."""
    batch, blocks_per_seq, heads_kv, head_dim = 3, 4, 2, 64
    k_cache = torch.randn(batch * blocks_per_seq, block_size, heads_kv, head_dim)
    v_cache = torch.randn(batch * blocks_per_seq, block_size, heads_kv, head_dim)
    block_table = torch.randperm(batch * blocks_per_seq).view(batch, blocks_per_seq).int()
    q = torch.randn(batch, 2, 8, head_dim)

    full = flash_attn_with_kvcache(q, k_cache, v_cache, block_table=block_table, causal=False)
    gathered_k = k_cache[block_table.long()].flatten(1, 2)  # [B, blocks_per_seq * block_size, Hkv, D]
    gathered_v = v_cache[block_table.long()].flatten(1, 2)
    assert_close(full, flash_attn_func(q, gathered_k, gathered_v))

    length = blocks_per_seq * block_size - 1
    partial = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=length, block_table=block_table, causal=True)
    assert_close(partial, flash_attn_func(q, gathered_k[:, :length], gathered_v[:, :length], causal=True))

    contiguous = flash_attn_with_kvcache(q, gathered_k, gathered_v, cache_seqlens=length, causal=True)
    assert_close(contiguous, partial)


def test_with_kvcache_prefill_into_empty_cache_equals_causal_attention():
    """A whole prompt written into an empty paged cache: same as causal attention over the prompt itself."""
    batch, seqlen, heads_kv, head_dim, block_size = 2, 97, 2, 128, 5
    k_cache = torch.zeros(60, block_size, heads_kv, head_dim)
    v_cache = torch.zeros(60, block_size, heads_kv, head_dim)
    table = torch.randperm(60)[:40].view(batch, 20).int()
    q = torch.randn(batch, seqlen, 16, head_dim)
    k, v = torch.randn(batch, seqlen, heads_kv, head_dim), torch.randn(batch, seqlen, heads_kv, head_dim)
    lengths = torch.zeros(batch, dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table, causal=True)
    assert_close(out, flash_attn_func(q, k, v, causal=True))


# --- bad input: named, value-bearing errors from qwen_fast.reshape_and_cache ----------------------------------------
# Every backend against the reference on every sample (strided views included), opcheck, compile: tests/test_ops.py.


def _cache_inputs(num_tokens, heads, head_dim, num_blocks, block_size, dtype):
    key, value = torch.randn(num_tokens, heads, head_dim).to(dtype), torch.randn(num_tokens, heads, head_dim).to(dtype)
    key_cache = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::3] = -1  # padding tokens
    return key, value, key_cache, key_cache.clone(), slots


def _replace(inputs, **changes):
    names = ("key", "value", "key_cache", "value_cache", "slot_mapping")
    values = dict(zip(names, inputs, strict=True)) | changes
    return [values[n] for n in names]


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda i: {"key": i[0].numpy()}, TypeError, "key must be a torch.Tensor, got ndarray"),
        (lambda i: {"key": i[0][0]}, ValueError, r"key must have 3 dimensions, got shape \(2, 64\)"),
        (lambda i: {"key": i[0].int()}, TypeError, "key must be float32 or float16 or bfloat16, got torch.int32"),
        (lambda i: {"value": i[1].half()}, TypeError, "value must be float32, got torch.float16"),
        (lambda i: {"value": i[1][:, :1]}, ValueError, r"value must be .* \(9, 2, 64\), got \(9, 1, 64\)"),
        (lambda i: {"key_cache": i[2][..., :32], "value_cache": i[3][..., :32]}, ValueError, "does not match key"),
        (
            lambda i: {"value_cache": i[3][:2]},
            ValueError,
            r"value_cache must be .*\(4, 5, 2, 64\), got \(2, 5, 2, 64\)",
        ),
        (lambda i: {"slot_mapping": i[4].int()}, TypeError, "slot_mapping must be int64, got torch.int32"),
        (lambda i: {"slot_mapping": i[4][:3]}, ValueError, r"slot_mapping must be \[N\].*\(9,\), got \(3,\)"),
        (lambda i: {"slot_mapping": i[4] + 20}, ValueError, r"slot_mapping holds slot \d+, past the cache's 20 slots"),
        (
            lambda i: {"key": i[0].transpose(1, 2).contiguous().transpose(1, 2)},
            ValueError,
            "key must be contiguous in its last",
        ),
        (
            lambda i: {"value": i[1].transpose(0, 1).contiguous().transpose(0, 1)},
            ValueError,
            "must have the strides of key",
        ),
        (lambda i: {"key": i[0].to("meta")}, ValueError, "value must be on meta like the other inputs, got cpu"),
    ],
)
def test_reshape_and_cache_bad_input(change, error, message):
    inputs = _cache_inputs(9, 2, 64, 4, 5, torch.float32)
    with pytest.raises(error, match=message):
        qwen_fast.reshape_and_cache(*_replace(inputs, **change(inputs)))


def test_reshape_and_cache_flash_is_the_same_write_with_vllm_arguments():
    key, value, key_cache, value_cache, slots = _cache_inputs(9, 2, 64, 4, 5, torch.float32)
    ours_k, ours_v = key_cache.clone(), value_cache.clone()
    with qwen_fast.record_backends() as calls:
        qwen_fast.reshape_and_cache_flash(
            key, value, key_cache, value_cache, slots, "auto", torch.ones(1), torch.ones(1)
        )
        qwen_fast.reshape_and_cache(key, value, ours_k, ours_v, slots)
    assert [op for op, _ in calls] == ["reshape_and_cache"] * 2
    page, row = divmod(int(slots[1]), 5)  # a written slot (every third is padding)
    assert torch.equal(key_cache[page, row], key[1]) and torch.equal(value_cache[page, row], value[1])
    assert torch.equal(key_cache, ours_k) and torch.equal(value_cache, ours_v)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (  # vLLM's reshape_and_cache layout: key_cache [num_blocks, Hkv, D / x, block_size, x]
            lambda i: {"key_cache": i[2].view(4, 5, 2, 8, 8).permute(0, 2, 3, 1, 4)},
            ValueError,
            r"key_cache has 5 dimensions \(4, 2, 8, 5, 8\): vLLM's reshape_and_cache layout .* is not supported",
        ),
        ({"kv_cache_dtype": "fp8_e5m2"}, ValueError, "kv_cache_dtype='fp8_e5m2' is not supported: pass 'auto'"),
        ({"kv_cache_dtype": "fp8"}, TypeError, "k_scale must be an fp32 tensor of one element with kv_cache_dtype"),
        (
            {"kv_cache_dtype": "fp8", "k_scale": torch.ones(1), "v_scale": torch.ones(1)},
            TypeError,
            "key_cache must be float8_e4m3fn, got torch.float32",
        ),
        (
            {"kv_cache_dtype": "fp8", "k_scale": torch.ones(2), "v_scale": torch.ones(1)}
            | {name: torch.zeros(4, 5, 2, 64, dtype=torch.uint8) for name in ("key_cache", "value_cache")},
            ValueError,
            r"k_scale must hold one element, got \(2,\)",
        ),
        ({"kv_cache_dtype": None}, TypeError, "kv_cache_dtype must be a str, got NoneType"),
        ({"k_scale": "1"}, TypeError, "k_scale must be a tensor, a float or None, got str"),
        ({"interleaved_v": True}, ValueError, "interleaved_v=True is not supported"),
    ],
)
def test_reshape_and_cache_refuses_what_it_does_not_implement(change, error, message):
    inputs = _cache_inputs(9, 2, 64, 4, 5, torch.float32)
    kwargs = dict(zip(("key", "value", "key_cache", "value_cache", "slot_mapping"), inputs, strict=True))
    kwargs |= change(inputs) if callable(change) else change
    before = inputs[2].clone()
    with pytest.raises(error, match=message):
        qwen_fast.reshape_and_cache(**kwargs)
    assert torch.equal(inputs[2], before)


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_fp8_cache_holds_key_over_scale_saturated(backend):
    """vLLM's fp8 KV cache: uint8 pages holding e4m3(x / scale), saturated at +-448 (e4m3's largest finite value)."""
    key = torch.tensor([[[1.0, -3.0, 1000.0, -1000.0]]]).half()
    value = torch.tensor([[[0.5, 0.25, -2.0, 7.0]]]).half()
    key_cache, value_cache = torch.zeros(2, 2, 1, 4, dtype=torch.uint8), torch.zeros(2, 2, 1, 4, dtype=torch.uint8)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        qwen_fast.reshape_and_cache_flash(
            key, value, key_cache, value_cache, torch.tensor([3]), "fp8", torch.tensor([2.0]), torch.tensor([0.5])
        )
    assert calls == [("reshape_and_cache", backend)]
    stored_k = key_cache.view(torch.float8_e4m3fn)[1, 1, 0].float()
    stored_v = value_cache.view(torch.float8_e4m3fn)[1, 1, 0].float()
    assert stored_k.tolist() == [0.5, -1.5, 448.0, -448.0] and stored_v.tolist() == [1.0, 0.5, -4.0, 14.0]
    assert not key_cache[0].any() and not key_cache[1, 0].any()


# --- bad input: named, value-bearing errors from qwen_fast.flash_attn_with_kvcache -----------------------------------


def _paged():
    return {
        "q": torch.randn(2, 1, 8, 64),
        "k_cache": torch.zeros(8, 4, 1, 64),
        "v_cache": torch.zeros(8, 4, 1, 64),
        "k": torch.randn(2, 1, 1, 64),
        "v": torch.randn(2, 1, 1, 64),
        "cache_seqlens": torch.tensor([3, 8], dtype=torch.int32),
        "block_table": torch.tensor([[3, -1, -1], [1, 2, 7]], dtype=torch.int32),
    }


def test_flash_attn_with_kvcache_ignores_unused_block_table_entries():
    out = qwen_fast.flash_attn_with_kvcache(**_paged())
    assert out.shape == (2, 1, 8, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("cache_seqlens", [4, None])
def test_flash_attn_with_kvcache_checks_exactly_the_used_block_table_entries(cache_seqlens):
    """An int or absent cache_seqlens: the columns every sequence uses are checked, the columns past them are not."""
    args = _paged() | {"k": None, "v": None, "cache_seqlens": cache_seqlens}
    used = 1 if cache_seqlens == 4 else 3  # pages of 4 slots
    args["block_table"] = torch.tensor([[3, 5, 6], [1, 2, 7]], dtype=torch.int32)
    args["block_table"][0, used:] = -1
    if used < 3:
        assert qwen_fast.flash_attn_with_kvcache(**args).shape == (2, 1, 8, 64)
    args["block_table"][1, used - 1] = 8
    with pytest.raises(ValueError, match=rf"block_table\[1, {used - 1}\] = 8 is used but not a block of k_cache"):
        qwen_fast.flash_attn_with_kvcache(**args)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"q": torch.randn(2, 8, 64)}, ValueError, r"q must have 4 dimensions, got shape \(2, 8, 64\)"),
        ({"k_cache": torch.zeros(8, 4, 1, 64).half()}, TypeError, "k_cache must be float32, got torch.float16"),
        ({"v_cache": torch.zeros(8, 4, 1, 32)}, ValueError, r"v_cache must be k_cache's shape \(8, 4, 1, 64\)"),
        (
            {"k_cache": torch.zeros(8, 4, 3, 64), "v_cache": torch.zeros(8, 4, 3, 64)},
            ValueError,
            "query heads Hq=8 must be a nonzero multiple of the key/value heads Hkv=3",
        ),
        ({"block_table": torch.tensor([[3, 0, 0]], dtype=torch.int32)}, ValueError, "must have q's B = 2 rows"),
        (
            {"block_table": torch.tensor([[3, 0, 0], [1, 2, 7]])},
            TypeError,
            "block_table must be int32, got torch.int64",
        ),
        (
            {"block_table": torch.tensor([[3, 0, 0], [1, 2, 8]], dtype=torch.int32)},
            ValueError,
            r"block_table\[1, 2\] = 8 is used but not a block of k_cache \(which has 8\)",
        ),
        ({"k": None}, ValueError, "k and v must be given together"),
        (
            {"k": torch.randn(2, 1, 2, 64), "v": torch.randn(2, 1, 2, 64)},
            ValueError,
            r"k must be \[B, Sq_new, Hkv, D\] = \(2, 1, 1, 64\), got \(2, 1, 2, 64\)",
        ),
        ({"cache_seqlens": None}, ValueError, "cache_seqlens is required with new k/v"),
        (
            {"cache_seqlens": torch.tensor([3, 12], dtype=torch.int32)},
            BlockTableTooSmallError,
            r"block_table \[B, max_blocks\] = \(2, 3\) holds 12 slots per sequence \(pages of 4\), too few for "
            r"cache_seqlens up to 12 plus 1 new tokens",
        ),
        (
            {"cache_seqlens": torch.tensor([-1, 3], dtype=torch.int32)},
            ValueError,
            r"cache_seqlens must lie in \[0, 11\] so that 1 new tokens fit the cache's 12 slots per sequence, "
            r"got \[-1, 3\]",
        ),
        ({"cache_seqlens": torch.tensor([4, 8])}, TypeError, "cache_seqlens must be int32, got torch.int64"),
        ({"cache_seqlens": torch.tensor([4], dtype=torch.int32)}, ValueError, r"cache_seqlens must be \[B\] = \(2,\)"),
        ({"cache_seqlens": 12}, RuntimeError, r"block_table .* too few for cache_seqlens up to 12 plus 1 new"),
        ({"cache_seqlens": -1}, ValueError, r"cache_seqlens must be in \[0, inf\], got -1"),
        (
            {"block_table": None},
            ValueError,
            r"a contiguous k_cache \[B, S_max, Hkv, D\] = \(8, 4, 1, 64\) must have q's B = 2",
        ),
        ({"causal": None}, TypeError, "causal must be a bool, got NoneType"),
        ({"alibi_slopes": torch.ones(8)}, ValueError, "alibi_slopes is not supported by qwen_fast"),
        (
            {"k_cache": torch.zeros(8, 4, 1, 64, dtype=torch.uint8)},
            TypeError,
            "an fp8 cache needs k_descale, an fp32 tensor",
        ),
        (
            {"k_cache": torch.zeros(8, 4, 1, 64, dtype=torch.float8_e5m2)},
            TypeError,
            "k_cache is float8_e5m2: only e4m3 fp8 caches",
        ),
        ({"k_descale": torch.ones(1)}, ValueError, "k_descale / v_descale are for an fp8 cache"),
        (
            {name: torch.zeros(8, 4, 1, 64, dtype=torch.uint8) for name in ("k_cache", "v_cache")}
            | {"k_descale": torch.ones(1), "v_descale": torch.ones(1)},
            ValueError,
            "new k/v cannot be appended to an fp8 cache here",
        ),
        (
            {name: torch.zeros(8, 4, 1, 64, dtype=torch.uint8) for name in ("k_cache", "v_cache")}
            | {"k_descale": torch.ones(3, 1), "v_descale": torch.ones(1), "k": None, "v": None},
            ValueError,
            r"k_descale must be \[B, Hkv\] = \(2, 1\), got \(3, 1\)",
        ),
        ({"softcap": -1.0}, ValueError, r"softcap must be finite and >= 0 \(0 = off\), got -1.0"),
        ({"softcap": "1"}, TypeError, "softcap must be a float, got str"),
        ({"num_splits": -1}, ValueError, r"num_splits must be in \[0, 128\], got -1"),
        ({"num_splits": 129}, ValueError, r"num_splits must be in \[0, 128\], got 129"),
        ({"return_softmax_lse": 1}, TypeError, "return_softmax_lse must be a bool, got int"),
        (
            {"cache_batch_idx": torch.tensor([0, 1], dtype=torch.int32)},
            ValueError,
            "cache_batch_idx is for a contiguous cache; a paged cache",
        ),
        ({"cache_leftpad": torch.tensor([0, 1])}, TypeError, "cache_leftpad must be int32, got torch.int64"),
        (
            {"cache_leftpad": torch.tensor([0, 9], dtype=torch.int32)},
            ValueError,
            r"cache_leftpad\[1\] = 9 must lie in \[0, cache_seqlens\[1\]\]",
        ),
        ({"rotary_cos": torch.ones(12, 16)}, ValueError, "rotary_cos and rotary_sin must be given together"),
        (
            {"rotary_cos": torch.ones(12, 40), "rotary_sin": torch.ones(12, 40)},
            ValueError,
            r"rotary_cos \[seqlen_ro, rotary_dim / 2\] = \(12, 40\) needs 0 < rotary_dim <= head dim 64",
        ),
        (
            {"rotary_cos": torch.ones(11, 16), "rotary_sin": torch.ones(11, 16)},
            ValueError,
            "rotary_cos has 11 positions, fewer than the cache's 12 slots per sequence",
        ),
        (
            {"rotary_cos": torch.ones(12, 16), "rotary_sin": torch.ones(12, 16), "k": None, "v": None},
            ValueError,
            "rotary_cos/rotary_sin need the new k and v",
        ),
    ],
)
def test_flash_attn_with_kvcache_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        qwen_fast.flash_attn_with_kvcache(**(_paged() | kwargs))


def test_flash_attn_with_kvcache_contiguous_cache_checks():
    q, cache = torch.randn(2, 1, 4, 32), torch.zeros(3, 6, 2, 32)
    with pytest.raises(ValueError, match=r"cache_batch_idx holds \[0, 3\], outside the cache's rows \[0, 3\)"):
        qwen_fast.flash_attn_with_kvcache(q, cache, cache, cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 6\] so that 0 new tokens fit"):
        qwen_fast.flash_attn_with_kvcache(
            q, cache, cache, cache_seqlens=7, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)
        )


def test_block_table_too_small_is_a_runtime_error_naming_block_table():
    """flash-attn's convention (RuntimeError naming block_table); qwen_fast's error is also a ValueError."""
    args = _paged() | {"cache_seqlens": torch.tensor([3, 12], dtype=torch.int32)}
    with pytest.raises(RuntimeError, match="block_table") as caught:
        qwen_fast.flash_attn_with_kvcache(**args)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_causal_defaults_to_false_as_flash_attn(backend):
    """flash-attn's default: omitting causal with Sq > 1 equals causal=False (and differs from causal=True)."""
    args = SPECS["flash_attn_with_kvcache"].sample("append2-paged5-g4").build(Inputs(torch.device("cpu")))
    args.pop("causal")
    runs = {}
    for causal in (None, False, True):
        kwargs = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in args.items()}
        with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
            runs[causal] = qwen_fast.flash_attn_with_kvcache(**kwargs, **({} if causal is None else {"causal": causal}))
        assert calls == [("flash_attn_with_kvcache", backend)]
    assert torch.equal(runs[None], runs[False])
    assert (runs[None] - runs[True]).abs().max() > 0.1


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_softmax_lse_is_inf_for_rows_without_keys(backend):
    """flash-attn's value for a row with nothing to attend to: out 0, lse +inf; the other rows' lse is the
    log-sum-exp of their scores."""
    q, k_cache, v_cache = torch.randn(1, 3, 2, 16), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out, lse = qwen_fast.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=1, causal=True, return_softmax_lse=True
        )  # 3 queries, 1 key: the first two rows see nothing (bottom-right alignment)
    assert calls == [("flash_attn_with_kvcache", backend)]
    assert torch.equal(out[0, :2], torch.zeros(2, 2, 16))
    assert torch.equal(lse[0, :, :2], torch.full((2, 2), float("inf")))
    expected = (q[0, 2] @ k_cache[0, 0, 0]) * 16**-0.5  # one key: its score is the log-sum-exp
    assert_close(lse[0, :, 2], expected)


# --- flash_attn_with_kvcache kernels: their own paths (every backend on every sample is tests/test_ops.py) -------


def _sample(name, dtype=torch.float32, device="cpu"):
    return SPECS["flash_attn_with_kvcache"].sample(name).build(Inputs(torch.device(device), dtype))


@pytest.mark.parametrize("sample", ["long-context-1500", "long-context-1500-window"])
def test_with_kvcache_cpu_splits_long_context_across_threads(sample):
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 (sequence, KV head) items for 4 threads: each sequence split in 2 and merged
    try:
        result = selftest.run_case("flash_attn_with_kvcache", "cpu", torch.device("cpu"), sample, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "PASS", result.line()


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_paged_attention_split_merge(splits):
    from qwen_fast.kernels.paged_attention import paged_attention

    args = _sample("read3-paged16-noncausal-window")
    seqlens, table = args["cache_seqlens"], args["block_table"]
    out, lse = paged_attention(args["q"], args["k_cache"], args["v_cache"], seqlens, table, None, 64**-0.5, 4, 2, 0.0,
                               splits)  # fmt: skip
    expected, expected_lse = flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert_within_budget(out, expected, expected)
    assert_close(lse, expected_lse)


def test_with_kvcache_native_rejects_bad_pages_before_writing():
    args = _sample("append2-paged5-g4")
    k_before = args["k_cache"].clone()
    table = args["block_table"].clone()
    table[0, 0] = -1
    inputs = (args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], args["cache_seqlens"], table)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0\] = -1 is used but not a block"):
        torch.ops.qwen_fast.flash_attn_with_kvcache(*inputs, None, 0.125, -1, 0, 0.0, 0, None, None)
    assert torch.equal(args["k_cache"], k_before)


@pytest.mark.gpu
def test_with_kvcache_triton_decode_captures_in_cuda_graph():
    """No host synchronisation on the triton path: a decode step (append + attention) records in a CUDA graph."""
    name, dtype = "decode-paged16-g8", torch.bfloat16

    def captured(op, kwargs):
        qwen_fast.flash_attn_with_kvcache(**_sample(name, dtype, "cuda"))  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qwen_fast.flash_attn_with_kvcache(**kwargs)
        graph.replay()
        return out

    result = selftest.run_case("flash_attn_with_kvcache", "triton", torch.device("cuda"), name, dtype, call=captured)
    assert result.status == "PASS", result.line()


@pytest.mark.parametrize("causal", [True, False])
def test_rotary_positions_follow_flash_attn(causal):
    """The new k row i is rotated at cache_seqlens[b] + i; q row i too when causal, else every q row at
    cache_seqlens[b]. Partial rotary (rotary_dim 16 < D 32) leaves the other dims as they are."""
    from qwen_fast.reference import apply_rotary_emb

    batch, num_new, head_dim, rows = 2, 3, 32, 16
    lengths = torch.tensor([4, 9], dtype=torch.int32)
    angles = torch.arange(rows)[:, None] * torch.rand(8)
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(batch, num_new, 4, head_dim)
    k, v = torch.randn(batch, num_new, 2, head_dim), torch.randn(batch, num_new, 2, head_dim)
    k_cache, v_cache = torch.randn(batch, rows, 2, head_dim), torch.randn(batch, rows, 2, head_dim)
    caches = (k_cache.clone(), v_cache.clone())
    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cos, sin, lengths, causal=causal, rotary_interleaved=False
    )  # fmt: skip

    steps = torch.arange(num_new)
    k_positions = lengths.long()[:, None] + steps
    q_positions = k_positions if causal else lengths.long()[:, None].expand(batch, num_new)
    table = torch.cat((cos, sin), dim=-1)
    q_rot = torch.cat((apply_rotary_emb(q_positions, q[..., :16], None, table)[0], q[..., 16:]), dim=-1)
    k_rot = torch.cat((apply_rotary_emb(k_positions, k[..., :16], None, table)[0], k[..., 16:]), dim=-1)
    expected = flash_attn_with_kvcache(q_rot, *caches, k_rot, v, cache_seqlens=lengths, causal=causal)
    assert_close(out, expected)
    assert torch.equal(k_cache, caches[0]) and torch.equal(k_cache[1, 9:12], k_rot[1])


@pytest.mark.interpret
def test_triton_refuses_fp8_cache_rows_off_16_bytes():
    """Element-wise fp8 loads spill registers (gpu_check): the triton backend reads fp8 pages whose rows start on 16
    bytes (vLLM's contiguous caches), and says so for others."""
    q = torch.randn(1, 1, 2, 64)
    padded = torch.zeros(1, 4, 1, 65, dtype=torch.uint8)[..., :64]  # rows of 65 bytes
    descale = torch.ones(1, 1)
    with qwen_fast.use_backend("triton"), pytest.raises(ValueError, match="fp8 caches whose rows start on 16 bytes"):
        qwen_fast.flash_attn_with_kvcache(q, padded, padded, cache_seqlens=3, k_descale=descale, v_descale=descale)


@pytest.mark.interpret
def test_triton_paged_attention_uses_the_splits_each_length_needs():
    """A grid of 20 splits over lengths 5, 300 and 4200 (pages of 16, fp32): the programs use 1, 2 and 17 splits
    (MIN_SPLIT_KEYS keys each), the others only write an lse of -inf; the merge reads 17 splits in two steps of
    MERGE_SPLITS and skips the empty ones. Out and lse match the reference."""
    from qwen_fast.kernels import paged_attention as kernels

    lengths = torch.tensor([5, 300, 4200], dtype=torch.int32)
    pages = -(-int(lengths.max()) // 16)
    k_cache, v_cache = torch.randn(3 * pages, 16, 1, 16), torch.randn(3 * pages, 16, 1, 16)
    table = torch.randperm(3 * pages, dtype=torch.int32).view(3, pages)
    q = torch.randn(3, 1, 2, 16)
    assert kernels.MERGE_SPLITS < 17 < 20
    out, lse = kernels.paged_attention(q, k_cache, v_cache, lengths, table, None, 0.25, -1, 0, 0.0, 20)
    expected, expected_lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, softmax_scale=0.25, causal=True,
        return_softmax_lse=True,
    )  # fmt: skip
    assert_close(out, expected)
    assert_close(lse, expected_lse)


def test_paged_split_count_follows_the_host_bound():
    """The split count comes from the host-known longest context (capped by the SMs and MAX_SPLITS), not the cache
    capacity: 1 split for 256 keys, more as the bound grows."""
    from qwen_fast.kernels.paged_attention import MAX_SPLITS, num_splits

    assert num_splits(4, 256, 132) == 1
    assert num_splits(4, 1024, 132) == 4
    assert num_splits(4, 40960, 132) == MAX_SPLITS
    assert num_splits(4, 4096, 132) == 16
    assert num_splits(132, 40960, 132) == 1  # one wave already


@pytest.mark.interpret
def test_with_kvcache_passes_the_host_lengths_as_split_bound(monkeypatch):
    """flash_attn_with_kvcache with host cache_seqlens sizes the triton kernel's splits from their maximum (plus the
    new tokens), not from the block table's capacity."""
    from qwen_fast.kernels import paged_attention as kernels

    seen = []
    split_count = kernels.num_splits
    monkeypatch.setattr(kernels, "num_splits", lambda *a: seen.append(a[1]) or split_count(*a))
    args = _sample("decode-paged16-g8")
    with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        qwen_fast.flash_attn_with_kvcache(**args)
    assert calls[0] == ("flash_attn_with_kvcache", "triton")
    longest = int(args["cache_seqlens"].max()) + args["k"].shape[1]
    assert seen == [longest] and longest < args["block_table"].shape[1] * args["k_cache"].shape[1]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window_size", [(-1, -1), (9, 0)])
def test_chunked_prefill_onto_a_cache_runs_the_prefill_kernel(monkeypatch, window_size, dtype):
    """A 20-token chunk of 4 query heads per KV head (80 rows > PREFILL_ROWS) appended to sequences holding 5 and
    40 tokens (pages of 16, scattered): the triton backend gathers the keys once and runs the varlen prefill kernel
    (host lengths known), with flash_attn_with_kvcache's results and lse."""
    from qwen_fast.kernels import attention as kernels

    ran = []
    prefill = kernels.paged_prefill
    monkeypatch.setattr(kernels, "paged_prefill", lambda *a: ran.append(a[-1]) or prefill(*a))
    lengths = torch.tensor([5, 40], dtype=torch.int32)
    k_cache, v_cache = torch.randn(12, 16, 1, 64).to(dtype), torch.randn(12, 16, 1, 64).to(dtype)
    table = torch.randperm(12, dtype=torch.int32)[:8].view(2, 4)
    q = torch.randn(2, 20, 4, 64).to(dtype)
    k, v = torch.randn(2, 20, 1, 64).to(dtype), torch.randn(2, 20, 1, 64).to(dtype)
    caches = (k_cache.clone(), v_cache.clone())
    kwargs = {"cache_seqlens": lengths, "block_table": table, "causal": True, "window_size": window_size}
    with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        out, lse = qwen_fast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kwargs, return_softmax_lse=True)
    assert ("flash_attn_with_kvcache", "triton") in calls and ran == [60]
    expected, expected_lse = flash_attn_with_kvcache(q.float(), *(c.float() for c in caches), k.float(), v.float(),
                                                     **kwargs, return_softmax_lse=True)  # fmt: skip
    low = flash_attn_with_kvcache(q, *caches, k, v, **kwargs)
    assert_within_budget(out, expected, low)
    assert_close(lse, expected_lse, torch.float16 if dtype == torch.float16 else None)
    assert torch.equal(k_cache, caches[0])  # the reference appended the same rows to its copies
