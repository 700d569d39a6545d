"""Samples of the attention and KV-cache ops: flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
reshape_and_cache.

GQA group sizes 1 to 16, head dims 32 to 256 (and 72, 136: not powers of two), seqlen_q != seqlen_k both ways,
causal and windowed masks, soft capping, the softmax_lse of return_attn_probs (on samples where every row sees a key:
an empty row's lse is +inf, checked in tests/test_attention.py), rows with no key to attend to (they must be exactly
0), empty sequences, pages of 1, 5
and 16 slots, padding slots (-1), and the tensor arguments as views: transformers' [B, H, S, D] layout, slices of
one fused qkv projection, stride-0 batches, caches whose rows are not 16-byte aligned, and index tensors
(cache_seqlens, block_table, cu_seqlens, slot_mapping) spaced, column-major or expanded.
"""

import math

import torch

from .inputs import Inputs, OpSpec, Sample, expanded, index_layout, padded, relayout, spaced


def _fused(args: dict, names: str, dim: int) -> dict:
    """args[name] for each name (a letter) as slices of one tensor concatenated along `dim` (one fused projection)."""
    tensors = [args[name] for name in names]
    views = torch.cat(tensors, dim).split([t.shape[dim] for t in tensors], dim)
    return dict(zip(names, views, strict=True))


def _dense(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, views=None, **options):
    def build(x: Inputs) -> dict:
        args = {
            "q": x.randn(batch, seqlen_q, heads_q, head_dim),
            "k": x.randn(batch, seqlen_k, heads_kv, head_dim),
            "v": x.randn(batch, seqlen_k, heads_kv, head_dim),
            **options,
        }
        return args | (views(args) if views else {})

    return build


def _hf_layout(args: dict) -> dict:
    """q, k, v stored as transformers' [B, H, S, D] (token stride D, head stride S * D)."""
    return {name: relayout(args[name], 1, 2) for name in ("q", "k", "v")}


LARGE = (torch.float32, torch.bfloat16)  # the CPU kernel's long loops: fp16 differs from bf16 only in conversion

FLASH_ATTN = OpSpec(
    samples=(
        Sample("B2-S9-g2-causal", _dense(2, 9, 9, 4, 2, 32, causal=True)),
        Sample("Sq1-Sk1", _dense(1, 1, 1, 4, 4, 64)),
        Sample("Sq1-Sk7", _dense(1, 1, 7, 4, 4, 64)),
        Sample("Sq7-Sk33-g8-causal", _dense(2, 7, 33, 8, 1, 64, causal=True)),
        Sample("Sq33-Sk7-D72-causal", _dense(1, 33, 7, 8, 2, 72, causal=True)),  # first rows see nothing
        Sample("D128-causal-window-left", _dense(1, 33, 33, 4, 1, 128, causal=True, window_size=(3, -1))),
        Sample("D72-window", _dense(1, 33, 33, 8, 8, 72, window_size=(5, 2))),
        Sample("window-0-0", _dense(1, 7, 33, 8, 1, 64, window_size=(0, 0))),
        Sample("window-0-0-Sq>Sk", _dense(1, 33, 7, 4, 1, 64, window_size=(0, 0))),
        Sample("Sk1-window-right", _dense(1, 33, 1, 8, 2, 128, window_size=(-1, 3))),
        Sample("D136-causal", _dense(1, 7, 9, 4, 2, 136, causal=True)),  # a masked head dim of 256
        Sample("softcap-causal", _dense(2, 9, 13, 8, 2, 64, softmax_scale=1.0, causal=True, softcap=3.0)),
        Sample("lse-window", _dense(2, 9, 13, 8, 2, 64, window_size=(3, 2), return_attn_probs=True)),
        Sample("lse-softcap-D72", _dense(1, 7, 7, 4, 1, 72, causal=True, softcap=2.0, return_attn_probs=True)),
        Sample("hf-layout-scale", _dense(2, 9, 20, 8, 2, 64, _hf_layout, softmax_scale=0.3, causal=True)),
        Sample("qkv-fused-views", _dense(2, 9, 9, 8, 2, 64, lambda a: _fused(a, "qkv", 2), causal=True)),
        Sample("kv-expanded", _dense(3, 5, 11, 4, 2, 64, lambda a: {
            "k": expanded(a["k"][:1], a["k"].shape), "v": expanded(a["v"][:1], a["v"].shape)}, causal=True)),
        Sample("decode-Sk300-D64", _dense(1, 1, 300, 8, 2, 64, causal=True), interpret=False),
        Sample("S97-D256-g16", _dense(1, 97, 97, 16, 1, 256, causal=True), interpret=False, dtypes=LARGE),
        Sample("Sq7-Sk300-D128-g4", _dense(1, 7, 300, 8, 2, 128), interpret=False, dtypes=LARGE),
        Sample("Sq300-Sk97-window", _dense(1, 300, 97, 4, 4, 128, causal=True, window_size=(40, -1)),
               interpret=False, dtypes=LARGE),
        Sample("gpu-S1000-D128-g8", _dense(2, 1000, 1000, 32, 4, 128, causal=True), gpu=True),
        Sample("gpu-decode-S1000-D256", _dense(2, 1, 1000, 16, 2, 256, causal=True), gpu=True),
    ),
    budget=True,
)  # fmt: skip


def _packed(lens_q, lens_k, heads_q, heads_kv, head_dim, extra_q=0, views=None, **options):
    """Packed sequences; `extra_q` trailing query rows outside every sequence (they must come out 0)."""

    def build(x: Inputs) -> dict:
        args = {
            "q": x.randn(sum(lens_q) + extra_q, heads_q, head_dim),
            "k": x.randn(sum(lens_k), heads_kv, head_dim),
            "v": x.randn(sum(lens_k), heads_kv, head_dim),
            "cu_seqlens_q": x.ints([0, *lens_q]).cumsum(0, dtype=torch.int32),
            "cu_seqlens_k": x.ints([0, *lens_k]).cumsum(0, dtype=torch.int32),
            "max_seqlen_q": max(lens_q),
            "max_seqlen_k": max(lens_k),
            **options,
        }
        return args | (views(args) if views else {})

    return build


def _cu_spaced(args: dict) -> dict:
    """The offsets spaced with decoy 0: a contiguous read sees empty or shorter sequences, never past the end."""
    return {name: spaced(args[name], 0, 0) for name in ("cu_seqlens_q", "cu_seqlens_k")}


FLASH_ATTN_VARLEN = OpSpec(
    samples=(
        Sample("lens-5-7-causal", _packed([5, 7], [5, 7], 4, 2, 32, causal=True)),
        Sample("empty-and-keyless", _packed([3, 0, 7, 1], [3, 0, 33, 0], 8, 2, 72, 2, causal=True)),
        Sample("window", _packed([1, 33, 2], [7, 5, 0], 8, 2, 72, 2, window_size=(2, 1))),
        Sample("all-empty", _packed([0, 0], [0, 0], 8, 2, 72, 2, causal=True)),
        Sample("causal-window", _packed([3, 0, 7, 1], [3, 0, 7, 13], 8, 2, 64, causal=True, window_size=(4, 0))),
        Sample("qkv-fused-views", _packed([4, 9], [4, 9], 8, 2, 64, views=lambda a: _fused(a, "qkv", 1), causal=True)),
        Sample("softcap-lse", _packed([3, 5], [4, 9], 8, 2, 64, softmax_scale=1.0, causal=True, softcap=4.0,
                                      return_attn_probs=True)),
        index_layout("cu-seqlens-spaced", _packed([3, 0, 7, 1], [3, 0, 7, 13], 4, 1, 64, views=_cu_spaced,
                                                  causal=True)),
        Sample("S97-D128", _packed([97, 2], [7, 2], 8, 2, 128, causal=True), interpret=False),
        Sample("gpu-S1000", _packed([1000, 0, 700, 300], [1000, 0, 700, 300], 32, 4, 128, causal=True,
                                    window_size=(100, -1)), gpu=True),
    ),
    budget=True,
    opcheck=("empty-and-keyless",),
)  # fmt: skip


def _kvcache(block_size, seqlen_q, num_new, heads_q, heads_kv, head_dim, lengths, views=None, **options):
    """Caches of random values; with block_size, a shuffled pool with one spare page per sequence, else contiguous
    caches [B, S_max, Hkv, D]. `lengths`: cache_seqlens. causal=True unless `options` say otherwise (flash-attn's
    default is False: the samples pass it explicitly)."""
    options = {"causal": True} | options

    def build(x: Inputs) -> dict:
        batch, totals = len(lengths), [n + num_new for n in lengths]
        table = None
        if block_size is None:
            cache_shape = (batch, max(totals) + 2, heads_kv, head_dim)
        else:
            pages = max(math.ceil(n / block_size) for n in totals) + 1
            table = x.perm(batch * pages + 3, torch.int32)[: batch * pages].view(batch, pages)
            cache_shape = (batch * pages + 3, block_size, heads_kv, head_dim)
        new = (batch, num_new, heads_kv, head_dim)
        args = {
            "q": x.randn(batch, seqlen_q, heads_q, head_dim),
            "k_cache": x.randn(*cache_shape),
            "v_cache": x.randn(*cache_shape),
            "k": x.randn(*new) if num_new else None,
            "v": x.randn(*new) if num_new else None,
            "cache_seqlens": x.ints(lengths),
            "block_table": table,
            **options,
        }
        return args | (views(args) if views else {})

    return build


APPEND2 = (5, 2, 2, 8, 2, 64, [0, 13, 41])  # pages of 5, append 2 tokens, GQA 4
READ3 = (16, 3, 0, 8, 2, 64, [2, 0, 57])  # pages of 16, 3 queries reading the cache


def _check_case(x: Inputs) -> dict:
    return {
        "q": x.randn(2, 1, 4, 32), "k_cache": x.randn(6, 4, 2, 32), "v_cache": x.randn(6, 4, 2, 32),
        "k": x.randn(2, 1, 2, 32), "v": x.randn(2, 1, 2, 32), "cache_seqlens": x.ints([5, 9]),
        "block_table": x.ints([[4, 1, 0], [2, 5, 3]]), "causal": True,
    }  # fmt: skip


def _ints(values: list, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=like.device)


def _rotary(rows: int, rotary_dim: int, **flags):
    """views adding rotary_cos/rotary_sin [rows, rotary_dim / 2] (theta 1e4 angles, q's dtype) and `flags`."""

    def views(a: dict) -> dict:
        inv_freq = 1e4 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.arange(rows, dtype=torch.float64)[:, None] * inv_freq
        put = {"dtype": a["q"].dtype, "device": a["q"].device}
        return {"rotary_cos": angles.cos().to(**put), "rotary_sin": angles.sin().to(**put), **flags}

    return views


def _fp8_caches(per_head: bool):
    """views turning the caches into vLLM's fp8 pages (uint8 holding e4m3(cache / descale)) read with k_descale /
    v_descale: fp32 [B, Hkv] (per_head) or one element."""

    def views(a: dict) -> dict:
        batch, heads_kv, device = a["q"].shape[0], a["k_cache"].shape[2], a["q"].device
        shape = (batch, heads_kv) if per_head else (1,)
        scales = {"k_descale": torch.linspace(0.25, 2.0, math.prod(shape)).reshape(shape).to(device)}
        scales["v_descale"] = scales["k_descale"].flip(0) * 0.5
        mean = {name: scales[name].mean() for name in scales}  # pages are shared: one scale quantizes them all
        caches = {
            cache: (a[cache].float() / mean[scale]).to(torch.float8_e4m3fn).view(torch.uint8)
            for cache, scale in (("k_cache", "k_descale"), ("v_cache", "v_descale"))
        }
        return caches | scales

    return views


def _batch_idx(a: dict) -> dict:
    """A contiguous cache of 4 rows for 3 sequences: sequence b uses row 2 - b (row 3 is never read)."""
    caches = {name: torch.cat((a[name].flip(0), a[name][:1])) for name in ("k_cache", "v_cache")}
    return caches | {"cache_batch_idx": _ints([2, 1, 0], a["q"])}


FLASH_ATTN_WITH_KVCACHE = OpSpec(
    samples=(
        Sample("decode-shuffled-pages", _check_case),
        Sample("decode-paged16-g8", _kvcache(16, 1, 1, 16, 2, 128, [0, 37, 70])),
        Sample("decode-paged1-g16", _kvcache(1, 1, 1, 16, 1, 64, [5, 0, 23])),
        Sample("append2-paged5-g4", _kvcache(*APPEND2)),
        Sample("append5-contiguous-g1", _kvcache(None, 5, 5, 2, 2, 64, [3, 0, 30])),
        Sample("append5-paged5-window", _kvcache(5, 5, 5, 8, 1, 128, [0, 9, 44], window_size=(6, 0))),
        Sample("read3-paged16-noncausal-window", _kvcache(*READ3, causal=False, window_size=(4, 2))),
        Sample("read3-contiguous-g8", _kvcache(None, 3, 0, 8, 1, 64, [1, 0, 29])),
        Sample("seqlens-int", _kvcache(*APPEND2, views=lambda a: {"cache_seqlens": 7})),
        Sample("seqlens-none", _kvcache(*READ3, views=lambda a: {"cache_seqlens": None}, causal=False)),
        Sample("caches-padded", _kvcache(*APPEND2, views=lambda a: {  # rows of 65 elements: unaligned
            "k_cache": padded(a["k_cache"]), "v_cache": padded(a["v_cache"])})),
        Sample("caches-different-layouts", _kvcache(*APPEND2, views=lambda a: {"v_cache": padded(a["v_cache"])})),
        index_layout("seqlens-expanded", _kvcache(*APPEND2[:-1], [13, 13, 13], views=lambda a: {
            "cache_seqlens": expanded(a["cache_seqlens"][:1], (3,), 0)})),
        index_layout("seqlens-expanded-read", _kvcache(*READ3[:-1], [40, 40, 40], views=lambda a: {
            "cache_seqlens": expanded(a["cache_seqlens"][:1], (3,), 0)})),
        index_layout("seqlens-spaced-read", _kvcache(*READ3, views=lambda a: {
            "cache_seqlens": spaced(a["cache_seqlens"], 0, 0)})),
        index_layout("block-table-column-major", _kvcache(*APPEND2, views=lambda a: {
            "block_table": relayout(a["block_table"], 0, 1)})),
        index_layout("block-table-spaced", _kvcache(*APPEND2, views=lambda a: {
            "block_table": spaced(a["block_table"], 1, 0)})),
        index_layout("block-table-expanded-read", _kvcache(*READ3, views=lambda a: {  # every sequence on the same pages
            "block_table": expanded(a["block_table"][:1], a["block_table"].shape, 0)})),
        Sample("new-kv-fused-views", _kvcache(*APPEND2, views=lambda a: _fused(a, "kv", 2))),
        Sample("q-hf-layout", _kvcache(*APPEND2, views=lambda a: {"q": relayout(a["q"], 1, 2)})),
        Sample("softcap-lse", _kvcache(*APPEND2, softcap=3.0, return_softmax_lse=True)),
        Sample("noncausal-lse-splits3", _kvcache(*READ3[:-1], [2, 9, 57], causal=False, num_splits=3,
                                                 return_softmax_lse=True)),
        Sample("leftpad-contiguous", _kvcache(None, 2, 2, 4, 2, 64, [3, 0, 30], views=lambda a: {
            "cache_leftpad": _ints([1, 0, 20], a["q"])})),
        Sample("leftpad-paged-window", _kvcache(*READ3, causal=False, window_size=(30, 2), views=lambda a: {
            "cache_leftpad": _ints([1, 0, 20], a["q"])})),
        Sample("cache-batch-idx", _kvcache(None, 2, 2, 4, 2, 64, [3, 0, 30], views=_batch_idx)),
        Sample("rotary-interleaved-half", _kvcache(*APPEND2, views=_rotary(64, 32))),
        Sample("rotary-neox-noncausal", _kvcache(None, 3, 3, 4, 2, 64, [3, 0, 30], causal=False, views=_rotary(
            40, 64, rotary_interleaved=False))),
        Sample("fp8-cache-paged", _kvcache(*READ3[:-1], [2, 9, 57], causal=False, views=_fp8_caches(True))),
        Sample("fp8-cache-contiguous-lse", _kvcache(None, 3, 0, 8, 2, 64, [1, 4, 29], views=_fp8_caches(False),
                                                    causal=False, return_softmax_lse=True)),
        Sample("long-context-1500", _kvcache(16, 1, 0, 8, 1, 128, [1500, 700]), interpret=False),
        Sample("long-context-1500-window", _kvcache(16, 1, 0, 8, 1, 128, [1500, 700], window_size=(900, 0)),
               interpret=False),
    ),
    budget=True,
    exact=("k_cache", "v_cache"),
    opcheck=("read3-paged16-noncausal-window", "leftpad-paged-window", "softcap-lse"),
)  # fmt: skip


def _write(tokens, heads, head_dim, num_blocks, block_size, views=None):
    """reshape_and_cache into caches of random values; every third token is padding (slot -1)."""

    def build(x: Inputs) -> dict:
        slots = x.perm(num_blocks * block_size)[:tokens]
        slots[::3] = -1
        args = {
            "key": x.randn(tokens, heads, head_dim),
            "value": x.randn(tokens, heads, head_dim),
            "key_cache": x.randn(num_blocks, block_size, heads, head_dim),
            "value_cache": x.randn(num_blocks, block_size, heads, head_dim),
            "slot_mapping": slots,
        }
        return args | (views(args) if views else {})

    return build


def _kv_of_qkv(args: dict) -> dict:
    """key and value as slices [:, 1] and [:, 2] of one [N, 3, H, D] projection (same strides)."""
    qkv = torch.stack((args["value"], args["key"], args["value"]), 1)
    return {"key": qkv[:, 1], "value": qkv[:, 2]}


def _fp8(args: dict) -> dict:
    """vLLM's fp8 cache: uint8 pages holding e4m3 bits, fp32 one-element scales (k_scale small enough that some
    keys saturate at +-448)."""
    caches = {name: args[name].to(torch.float8_e4m3fn).view(torch.uint8) for name in ("key_cache", "value_cache")}
    device = args["key"].device
    scales = {"k_scale": torch.tensor([0.005], device=device), "v_scale": torch.tensor([2.0], device=device)}
    return caches | scales | {"kv_cache_dtype": "fp8"}


RESHAPE_AND_CACHE = OpSpec(
    samples=(
        Sample("N5-padding-slot", lambda x: {
            "key": x.randn(5, 2, 32), "value": x.randn(5, 2, 32), "key_cache": x.zeros(4, 4, 2, 32),
            "value_cache": x.zeros(4, 4, 2, 32), "slot_mapping": x.ints([3, 14, -1, 0, 9], torch.int64)}),
        Sample("N0", _write(0, 4, 64, 3, 16)),
        Sample("N1-block1", _write(1, 1, 64, 1, 1)),
        Sample("N7-block1-D128", _write(7, 4, 128, 9, 1)),
        Sample("N33-D96", _write(33, 4, 96, 5, 16)),
        Sample("N20-block5", _write(20, 2, 64, 7, 5)),
        Sample("kv-fused-views", _write(20, 2, 64, 7, 5, _kv_of_qkv)),
        index_layout("slots-spaced", _write(20, 2, 64, 7, 5, lambda a: {
            "slot_mapping": spaced(a["slot_mapping"], 0, -1)})),
        Sample("caches-padded", _write(20, 2, 64, 7, 5, lambda a: {
            "key_cache": padded(a["key_cache"]), "value_cache": padded(a["value_cache"])})),
        Sample("fp8-cache", _write(20, 2, 64, 7, 5, _fp8)),
    ),
    exact=("key_cache", "value_cache"),
    compiles_reference=True,
)  # fmt: skip
