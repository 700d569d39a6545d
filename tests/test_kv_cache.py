"""qwen_fast.reference.kv_cache: cache writes slot by slot, and attention over paged / contiguous caches."""

import pytest
import torch
from numerics import assert_close, assert_within_budget

import qwen_fast
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
    partial = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=length, block_table=block_table)
    assert_close(partial, flash_attn_func(q, gathered_k[:, :length], gathered_v[:, :length], causal=True))

    contiguous = flash_attn_with_kvcache(q, gathered_k, gathered_v, cache_seqlens=length)
    assert_close(contiguous, partial)


def test_with_kvcache_prefill_into_empty_cache_equals_causal_attention():
    """A whole prompt written into an empty paged cache: same as causal attention over the prompt itself."""
    batch, seqlen, heads_kv, head_dim, block_size = 2, 97, 2, 128, 5
    k_cache = torch.zeros(60, block_size, heads_kv, head_dim)
    v_cache = torch.zeros(60, block_size, heads_kv, head_dim)
    block_table = torch.randperm(60)[:40].view(batch, 20).int()
    q = torch.randn(batch, seqlen, 16, head_dim)
    k, v = torch.randn(batch, seqlen, heads_kv, head_dim), torch.randn(batch, seqlen, heads_kv, head_dim)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, torch.zeros(batch, dtype=torch.int32), block_table)
    assert_close(out, flash_attn_func(q, k, v, causal=True))


# --- reshape_and_cache: every backend against the reference, opcheck, torch.compile, bad input ---------------------

# (backend, device of the tensors)
KV_BACKENDS = [
    ("cpu", "cpu"),
    ("torch", "cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.interpret),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu),
]


def _cache_inputs(num_tokens, heads, head_dim, num_blocks, block_size, dtype, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # key and value as views into one fused projection, as in an attention layer
        qkv = torch.randn(num_tokens, 3, heads, head_dim, generator=gen).to(dtype)
        key, value = qkv[:, 1], qkv[:, 2]
    else:
        key = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    key_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen).to(dtype)
    capacity = num_blocks * block_size
    slots = torch.randperm(capacity, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens
    slots = slots.to(torch.int64)
    if strided:  # the slot mapping as a strided view too (a kernel reading slot t at offset t would be wrong)
        slots = torch.stack((slots, torch.full_like(slots, 10**9)), dim=1)[:, 0]
    return key, value, key_cache, value_cache, slots


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,heads,head_dim,num_blocks,block_size",
    [(0, 4, 64, 3, 16), (1, 1, 64, 1, 1), (7, 4, 128, 9, 1), (33, 4, 96, 5, 16), (20, 2, 64, 7, 5)],
)
@pytest.mark.parametrize("strided", [False, True])
def test_reshape_and_cache_matches_reference(
    backend, device, dtype, num_tokens, heads, head_dim, num_blocks, block_size, strided
):
    inputs = _cache_inputs(num_tokens, heads, head_dim, num_blocks, block_size, dtype, strided)
    key, value, key_cache, value_cache, slots = (t.to(device) for t in inputs)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache(key, value, expected_k, expected_v, slots)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        qwen_fast.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert calls == [("reshape_and_cache", backend)]
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)  # a copy is exact


def test_reshape_and_cache_opcheck_native():
    torch.library.opcheck(torch.ops.qwen_fast.reshape_and_cache.default, _cache_inputs(9, 2, 64, 4, 5, torch.float16))


@pytest.mark.interpret
def test_reshape_and_cache_opcheck_triton():
    torch.library.opcheck(
        torch.ops.qwen_fast_triton.reshape_and_cache.default, _cache_inputs(9, 2, 64, 4, 5, torch.float16)
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_reshape_and_cache_compiles_fullgraph(backend):
    key, value, key_cache, value_cache, slots = _cache_inputs(9, 2, 64, 4, 5, torch.float32)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reshape_and_cache(key, value, expected_k, expected_v, slots)

    @torch.compile(fullgraph=True, backend="eager" if backend == "torch" else "inductor")
    def write(k, v, kc, vc, s):
        qwen_fast.reshape_and_cache(k, v, kc, vc, s)
        return kc.sum() + vc.sum()

    torch._dynamo.reset()
    with qwen_fast.use_backend(backend):
        write(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


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
            ValueError,
            r"cache_seqlens must lie in \[0, 11\] so that 1 new tokens fit the cache's 12 slots per sequence, "
            r"got \[3, 12\]",
        ),
        ({"cache_seqlens": torch.tensor([4, 8])}, TypeError, "cache_seqlens must be int32, got torch.int64"),
        ({"cache_seqlens": torch.tensor([4], dtype=torch.int32)}, ValueError, r"cache_seqlens must be \[B\] = \(2,\)"),
        ({"cache_seqlens": 12}, ValueError, r"cache_seqlens must be in \[0, 11\], got 12"),
        (
            {"block_table": None},
            ValueError,
            r"a contiguous k_cache \[B, S_max, Hkv, D\] = \(8, 4, 1, 64\) must have q's B = 2",
        ),
        ({"causal": None}, TypeError, "causal must be a bool, got NoneType"),
    ],
)
def test_flash_attn_with_kvcache_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        qwen_fast.flash_attn_with_kvcache(**(_paged() | kwargs))


# --- flash_attn_with_kvcache: every backend against the reference within flash-attn's error budget ---------------

# (paged, block_size, seqlen_q, num_new, heads_q, heads_kv, head_dim, window_size, causal, cache_seqlens)
ATTN_CASES = {
    "decode-paged16-g8": (True, 16, 1, 1, 16, 2, 128, (-1, -1), True, [0, 37, 70]),
    "decode-paged1-g16": (True, 1, 1, 1, 16, 1, 64, (-1, -1), True, [5, 0, 23]),
    "append2-paged5-g4": (True, 5, 2, 2, 8, 2, 64, (-1, -1), True, [0, 13, 41]),
    "append5-contig-g1": (False, None, 5, 5, 2, 2, 64, (-1, -1), True, [3, 0, 30]),
    "append5-paged5-window": (True, 5, 5, 5, 8, 1, 128, (6, 0), True, [0, 9, 44]),
    "read3-paged16-noncausal-window": (True, 16, 3, 0, 8, 2, 64, (4, 2), False, [2, 0, 57]),
    "read3-contig-g8": (False, None, 3, 0, 8, 1, 64, (-1, -1), True, [1, 0, 29]),
}


def _attn_case(name, dtype, device="cpu", seed=0, padded=False):
    """The case's arguments; `padded` caches are views [..., :D] of a pool with D + 1 columns (rows not aligned)."""
    paged, block_size, seqlen_q, num_new, heads_q, heads_kv, head_dim, window, causal, lengths = ATTN_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    totals = [n + num_new for n in lengths]
    if paged:  # a shuffled pool, with sequences spanning many pages and one spare page per sequence
        blocks_per_seq = max(-(-n // block_size) for n in totals) + 1
        num_blocks = batch * blocks_per_seq + 3
        block_table = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, -1).int()
        cache_shape = (num_blocks, block_size, heads_kv, head_dim)
    else:
        block_table, cache_shape = None, (batch, max(totals) + 2, heads_kv, head_dim)
    new_shape = (batch, num_new, heads_kv, head_dim)
    pool_shape = (*cache_shape[:3], head_dim + padded)
    args = {
        "q": torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen),
        "k_cache": torch.randn(pool_shape, generator=gen),
        "v_cache": torch.randn(pool_shape, generator=gen),
        "k": torch.randn(new_shape, generator=gen) if num_new else None,
        "v": torch.randn(new_shape, generator=gen) if num_new else None,
    }
    args = {k: None if t is None else t.to(device=device, dtype=dtype) for k, t in args.items()}
    args["k_cache"], args["v_cache"] = args["k_cache"][..., :head_dim], args["v_cache"][..., :head_dim]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    table = None if block_table is None else block_table.to(device)
    return args | {"cache_seqlens": seqlens, "block_table": table, "causal": causal, "window_size": window}


def _clone(args, dtype=None):
    """A copy of the arguments (fresh caches), the floating-point tensors cast to `dtype` when given."""
    copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if dtype is not None:
        copy |= {k: v.to(dtype) for k, v in copy.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return copy


def _check_backend(backend, args):
    """Runs `backend` on args (mutating its caches) and checks output and caches against the reference."""
    ref_fp32 = flash_attn_with_kvcache(**_clone(args, torch.float32))
    expected = _clone(args)
    ref_lowprec = flash_attn_with_kvcache(**expected)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        out = qwen_fast.flash_attn_with_kvcache(**args)
    assert calls == [("flash_attn_with_kvcache", backend)]
    assert out.dtype == args["q"].dtype and out.shape == ref_fp32.shape
    assert_within_budget(out.cpu(), ref_fp32.cpu(), ref_lowprec.cpu())
    assert torch.equal(args["k_cache"], expected["k_cache"]) and torch.equal(args["v_cache"], expected["v_cache"])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_with_kvcache_cpu_backend(case, dtype):
    _check_backend("cpu", _attn_case(case, dtype))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["decode-paged16-g8", "decode-paged1-g16", "append5-paged5-window", "read3-contig-g8"])
def test_with_kvcache_triton_backend_interpreted(case, dtype):
    _check_backend("triton", _attn_case(case, dtype))


@pytest.mark.parametrize(
    "backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpret), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_with_kvcache_unaligned_cache_rows(backend):
    """Caches whose rows do not start on 16 bytes: the Triton launcher's unaligned config, strided CPU reads."""
    device, backend = ("cuda", "triton") if backend == "cuda" else ("cpu", backend)
    args = _attn_case("append2-paged5-g4", torch.float16, device, padded=True)
    assert args["k_cache"].stride(-2) == 65
    _check_backend(backend, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_with_kvcache_triton_backend_cuda(case, dtype):
    _check_backend("triton", _attn_case(case, dtype, device="cuda"))


def _long_context(device, dtype, window_size=(-1, -1)):
    """One sequence long enough to be split across threads / programs: 1500 keys over pages of 16."""
    lengths, block_size, gen = [1500, 700], 16, torch.Generator().manual_seed(1)
    block_table = torch.randperm(200, generator=gen)[:190].view(2, 95).int()
    k_cache, v_cache = (torch.randn(200, block_size, 1, 128, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(2, 1, 8, 128, generator=gen).to(device, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": seqlens,
            "block_table": block_table.to(device), "window_size": window_size}  # fmt: skip


@pytest.mark.parametrize("window_size", [(-1, -1), (900, 0)])
def test_with_kvcache_cpu_splits_long_context_across_threads(window_size):
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 (sequence, KV head) items for 4 threads: each sequence split in 2 and merged
    try:
        _check_backend("cpu", _long_context("cpu", torch.bfloat16, window_size))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_paged_attention_split_merge(splits):
    from qwen_fast.kernels.paged_attention import paged_attention

    args = _attn_case("read3-paged16-noncausal-window", torch.float32)
    expected = flash_attn_with_kvcache(**_clone(args))
    seqlens, table = args["cache_seqlens"], args["block_table"]
    out = paged_attention(args["q"], args["k_cache"], args["v_cache"], seqlens, table, 64**-0.5, 4, 2, splits)
    assert_within_budget(out, expected, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_with_kvcache_triton_long_context_cuda(dtype):
    _check_backend("triton", _long_context("cuda", dtype))


def _paged_attention_args(dtype):
    args = _attn_case("append2-paged5-g4", dtype)
    return (args["q"], args["k_cache"], args["v_cache"], args["cache_seqlens"], args["block_table"], 0.125, -1, 0)


@pytest.mark.parametrize("new_kv", [True, False])
def test_with_kvcache_opcheck_native(new_kv):
    args = _attn_case("append2-paged5-g4", torch.float32)
    k, v = (args["k"], args["v"]) if new_kv else (None, None)
    inputs = (args["q"], args["k_cache"], args["v_cache"], k, v, args["cache_seqlens"], args["block_table"])
    torch.library.opcheck(torch.ops.qwen_fast.flash_attn_with_kvcache.default, (*inputs, 0.125, -1, 0))


@pytest.mark.interpret
def test_paged_attention_opcheck_triton():
    torch.library.opcheck(torch.ops.qwen_fast_triton.paged_attention.default, _paged_attention_args(torch.float32))


def test_with_kvcache_compiles_fullgraph_cpu():
    args = _attn_case("append2-paged5-g4", torch.float32)
    expected = _clone(args)
    ref = flash_attn_with_kvcache(**expected)

    @torch.compile(fullgraph=True)
    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        return qwen_fast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table)

    torch._dynamo.reset()
    with qwen_fast.use_backend("cpu"):
        out = step(*(args[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")))
    assert_within_budget(out, ref, ref)
    assert torch.equal(args["k_cache"], expected["k_cache"]) and torch.equal(args["v_cache"], expected["v_cache"])


def test_with_kvcache_native_rejects_bad_pages_before_writing():
    args = _attn_case("append2-paged5-g4", torch.float32)
    k_before = args["k_cache"].clone()
    table = args["block_table"].clone()
    table[0, 0] = -1
    inputs = (args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], args["cache_seqlens"], table)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0\] = -1 is used but not a block"):
        torch.ops.qwen_fast.flash_attn_with_kvcache(*inputs, 0.125, -1, 0)
    assert torch.equal(args["k_cache"], k_before)


@pytest.mark.gpu
def test_with_kvcache_triton_decode_captures_in_cuda_graph():
    """No host synchronisation on the triton path: a decode step (append + attention) records in a CUDA graph."""
    args = _attn_case("decode-paged16-g8", torch.bfloat16, device="cuda")
    expected = _clone(args)
    ref = flash_attn_with_kvcache(**expected)
    with qwen_fast.use_backend("triton"):
        qwen_fast.flash_attn_with_kvcache(**_clone(args))  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qwen_fast.flash_attn_with_kvcache(**args)
    graph.replay()
    torch.cuda.synchronize()
    assert_within_budget(out, flash_attn_with_kvcache(**_clone(args, torch.float32)), ref)
    assert torch.equal(args["k_cache"], expected["k_cache"]) and torch.equal(args["v_cache"], expected["v_cache"])
