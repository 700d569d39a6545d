"""Samples of the RoPE ops: rotary_embedding, qk_norm_rope_and_cache.

Qwen3-235B's YaRN table over 131,072 positions (the last one used), rotate-half and interleaved pairs, a table in
fp32 or in the model dtype, T = 0 and 1, pages of 1, 5 and 16 slots with padding slots, vLLM's flat [T, H * D]
layout, partial rotary with rope_dim_offset and inverse, and the tensor arguments as views: q/k/v slices of one
fused projection, a non-contiguous [B, S, H, D] batch, positions spaced or expanded over the batch (what
GQAAttention passes when transformers gives cos [1, S, D] with batch > 1), caches whose rows are not 16-byte
aligned.
"""

import torch

from .inputs import Inputs, OpSpec, Sample, expanded, index_layout, padded, spaced

POSITIONS = 131072  # Qwen3-235B-A22B with YaRN


def _heads(x: Inputs, tokens, head_dim, heads_q, heads_kv, fused) -> dict:
    """query [T, Hq, D], key (3x the scale: norms see more than unit rows), value; `fused`: slices of one qkv."""
    if fused:
        qkv = x.randn(tokens, heads_q + 2 * heads_kv, head_dim)
        return dict(zip(("query", "key", "value"), qkv.split([heads_q, heads_kv, heads_kv], dim=1), strict=True))
    return {
        "query": x.randn(tokens, heads_q, head_dim),
        "key": x.randn(tokens, heads_kv, head_dim, scale=3.0),
        "value": x.randn(tokens, heads_kv, head_dim),
    }


def _positions(x: Inputs, tokens: int) -> torch.Tensor:
    """int64 [T] in [0, 131072), the last one 131071."""
    positions = x.randint(0, POSITIONS, tokens)
    positions[-1:] = POSITIONS - 1
    return positions


def _table(x: Inputs, head_dim: int, table_dtype: str) -> torch.Tensor:
    """The YaRN table in fp32 ("fp32") or in the dtype under test ("model")."""
    return x.rope_table(head_dim, POSITIONS, yarn=True, dtype=None if table_dtype == "model" else torch.float32)


def _rotary(tokens, head_dim, heads_q, heads_kv, is_neox, table_dtype, fused=False, views=None):
    """rotary_embedding; `table_dtype` "fp32" or "model" (the cos/sin table in the dtype under test)."""

    def build(x: Inputs) -> dict:
        heads = _heads(x, tokens, head_dim, heads_q, heads_kv, fused)
        args = {"positions": _positions(x, tokens), "query": heads["query"], "key": heads["key"], "head_size": head_dim,
                "cos_sin_cache": _table(x, head_dim, table_dtype), "is_neox": is_neox}  # fmt: skip
        return args | (views(args) if views else {})

    return build


def _batched(x: Inputs, positions_view) -> dict:
    """[B=2, S=3] tokens: query a non-contiguous view [B, S, Hq, D], positions [B, S] through positions_view."""
    return {
        "positions": positions_view(x.ints([[0, 1, 2], [131069, 131070, 131071]], torch.int64)),
        "query": x.randn(3, 2, 5, 64).transpose(0, 1)[:, :, 1:],
        "key": x.randn(2, 3, 2, 64),
        "head_size": 64,
        "cos_sin_cache": x.rope_table(64, POSITIONS, yarn=True),
        "is_neox": True,
    }


# (T, D, Hq, Hkv, block_size, fused qkv) x (is_neox, table dtype): both pairings and both roundings.
CASES = [(0, 64, 8, 2, 16, False), (1, 128, 8, 2, 1, True), (7, 64, 4, 4, 5, False), (33, 128, 8, 2, 16, True),
         (33, 64, 4, 4, 1, False)]  # fmt: skip
MODES = [(True, "fp32"), (False, "model")]


def _name(tokens, head_dim, heads_q, heads_kv, block_size, fused, is_neox, table_dtype) -> str:
    layout = "fused" if fused else "separate"
    pairs = "neox" if is_neox else "interleaved"
    return f"T{tokens}-D{head_dim}-{heads_q}x{heads_kv}-b{block_size}-{layout}-{pairs}-table-{table_dtype}"


ROTARY_EMBEDDING = OpSpec(
    samples=(
        Sample("T5-D32", lambda x: {
            "positions": x.ints([0, 3, 17, 40, 63], torch.int64), "query": x.randn(5, 4, 32), "key": x.randn(5, 2, 32),
            "head_size": 32, "cos_sin_cache": x.rope_table(32, 64), "is_neox": True}),
        *(Sample(_name(*case, *mode), _rotary(*case[:4], *mode, fused=case[5])) for case in CASES for mode in MODES),
        Sample("batched-noncontiguous", lambda x: _batched(x, lambda p: p)),
        index_layout("positions-expanded-over-batch", lambda x: _batched(x, lambda p: expanded(p[:1], (2, 3), 0))),
        index_layout("positions-stride0", _rotary(7, 64, 4, 2, True, "fp32", views=lambda a: {  # decode, batch 7
            "positions": expanded(a["positions"][:1], (7,), 0)})),
        index_layout("positions-spaced", _rotary(7, 64, 4, 2, True, "fp32", views=lambda a: {
            "positions": spaced(a["positions"], 0, 0)})),
        Sample("key-none", _rotary(7, 64, 4, 2, False, "fp32", views=lambda a: {"key": None})),
        Sample("flat-heads", _rotary(7, 64, 4, 2, True, "fp32", views=lambda a: {  # vLLM's [T, H * D] layout
            "query": a["query"].flatten(1), "key": a["key"].flatten(1)})),
        Sample("partial-offset-inverse", lambda x: {  # dims [16, 48) of each head turn back by the angles
            "positions": _positions(x, 7), "query": x.randn(7, 4 * 64), "key": x.randn(7, 2, 64), "head_size": 64,
            "cos_sin_cache": _table(x, 32, "fp32"), "is_neox": False, "rope_dim_offset": 16, "inverse": True}),
    ),
    exact_on_cpu=("query", "key"),  # same operations in the same order: the reference's bits
    compiles_reference=True,
    opcheck=("T7-D64-4x4-b5-separate-interleaved-table-model",),
)  # fmt: skip


def qk_norm_rope_and_cache_args(
    tokens, head_dim, heads_q, heads_kv, block_size, fused, is_neox, table_dtype, views=None
):
    """qk_norm_rope_and_cache with Qwen3-style norm weights (1 + N(0, 0.5^2)); every third token from the second
    on is padding (slot -1)."""

    def build(x: Inputs) -> dict:
        num_blocks = tokens // block_size + 3
        slots = x.perm(num_blocks * block_size)[:tokens]
        slots[1::3] = -1
        args = _heads(x, tokens, head_dim, heads_q, heads_kv, fused) | {
            "positions": _positions(x, tokens), "cos_sin_cache": _table(x, head_dim, table_dtype), "is_neox": is_neox,
            "q_norm_weight": x.randn(head_dim, scale=0.5) + 1, "k_norm_weight": x.randn(head_dim, scale=0.5) + 1,
            "eps": 1e-6, "key_cache": x.randn(num_blocks, block_size, heads_kv, head_dim),
            "value_cache": x.randn(num_blocks, block_size, heads_kv, head_dim), "slot_mapping": slots,
        }  # fmt: skip
        return args | (views(args) if views else {})

    return build


QK_NORM_ROPE_AND_CACHE = OpSpec(
    samples=(
        Sample("T5-D32", lambda x: {
            "query": x.randn(5, 4, 32), "key": x.randn(5, 2, 32), "value": x.randn(5, 2, 32),
            "q_norm_weight": x.randn(32), "k_norm_weight": x.randn(32), "eps": 1e-6,
            "positions": x.ints([0, 3, 17, 40, 63], torch.int64), "cos_sin_cache": x.rope_table(32, 64),
            "key_cache": x.zeros(4, 4, 2, 32), "value_cache": x.zeros(4, 4, 2, 32),
            "slot_mapping": x.ints([3, 14, -1, 0, 9], torch.int64)}),
        *(Sample(_name(*case, *mode), qk_norm_rope_and_cache_args(*case, *mode)) for case in CASES for mode in MODES),
        index_layout("positions-expanded", qk_norm_rope_and_cache_args(7, 64, 4, 2, 5, True, True, "fp32", lambda a: {
            "positions": expanded(a["positions"][:1], (7,), 0)})),
        index_layout("slots-spaced", qk_norm_rope_and_cache_args(7, 64, 4, 2, 5, False, True, "fp32", lambda a: {
            "slot_mapping": spaced(a["slot_mapping"], 0, -1)})),
        Sample("caches-padded", qk_norm_rope_and_cache_args(7, 64, 4, 2, 5, False, False, "model", lambda a: {
            "key_cache": padded(a["key_cache"]), "value_cache": padded(a["value_cache"])})),
    ),
    exact=("value_cache",),  # a copy; the keys are compared with the table (fp32 sums of squares in any order)
    compiles_reference=True,
    opcheck=("T7-D64-4x4-b5-separate-interleaved-table-model",),
)  # fmt: skip
