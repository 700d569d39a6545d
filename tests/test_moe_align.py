"""qwen_fast.reference.moe_align.moe_align_block_size: its documented layout, checked two ways.

1. Invariants of the contract (every flat index exactly once, runs padded to block_size, expert_ids consistent with
   the entries, sizes and fill values as documented).
2. Bit-for-bit equality with the layout written out in plain Python lists, one expert at a time.
"""

import math

import pytest
import torch

import qwen_fast
from qwen_fast.reference.moe_align import moe_align_block_size


def _plain_python(topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """The documented layout, built with lists."""
    flat = topk_ids.flatten().tolist()
    n = len(flat)
    size = n + min(num_experts, n) * (block_size - 1)
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        if not mine:
            continue
        padded = math.ceil(len(mine) / block_size) * block_size
        sorted_ids += mine + [n] * (padded - len(mine))
        expert_ids += [e] * (padded // block_size)
    used = len(sorted_ids)
    sorted_ids += [n] * (size - used)
    expert_ids += [0] * (math.ceil(size / block_size) - len(expert_ids))  # vLLM's fill
    return sorted_ids, expert_ids, used


def _check_invariants(topk_ids, block_size, num_experts, sorted_ids, expert_ids, num_post_padded):
    flat = topk_ids.flatten().long()
    n = flat.numel()
    size = n + min(num_experts, n) * (block_size - 1)
    assert sorted_ids.dtype == expert_ids.dtype == num_post_padded.dtype == torch.int32
    assert sorted_ids.shape == (size,)
    assert expert_ids.shape == ((size + block_size - 1) // block_size,)
    assert num_post_padded.shape == (1,)

    used = num_post_padded.item()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    assert used == padded.sum().item() and used % block_size == 0 and used <= size

    real = sorted_ids[:used][sorted_ids[:used] != n].long()
    assert torch.equal(real.sort().values, torch.arange(n)), "every flat index exactly once"
    assert (sorted_ids[used:] == n).all(), "sentinel past num_tokens_post_padded"
    assert (expert_ids[used // block_size :] == 0).all(), "0 past the used blocks (vLLM's fill)"

    blocks = sorted_ids[:used].view(-1, block_size).long()
    block_experts = expert_ids[: used // block_size].long()
    assert (block_experts[1:] >= block_experts[:-1]).all(), "ascending experts"
    for block, expert in zip(blocks.tolist(), block_experts.tolist(), strict=True):
        entries = [i for i in block if i != n]
        assert entries, "no block is all padding"
        assert entries == block[: len(entries)], "padding only at the end of a run"
        assert all(flat[i] == expert for i in entries), "expert_ids[b] is the expert of block b's entries"
    for e in range(num_experts):
        mine = (block_experts == e).nonzero().flatten()
        assert mine.numel() == padded[e].item() // block_size, "ceil(count / block_size) blocks per expert"
        entries = blocks[mine].flatten()
        entries = entries[entries != n]
        assert (entries[1:] > entries[:-1]).all(), "ascending flat index within an expert"


def _routing(case: str) -> tuple[torch.Tensor, int]:
    """(topk_ids, num_experts) for a named routing."""
    if case == "random":  # prime expert count, k distinct experts per token
        return torch.rand(37, 61).argsort(-1)[:, :4].int(), 61
    if case == "decode":  # T = 1, Qwen3-30B-A3B's 128 experts / top-8: fewer pairs than experts
        return torch.randperm(128)[:8].view(1, 8).int(), 128
    if case == "one-expert":  # every token on expert 3
        return torch.full((50, 1), 3, dtype=torch.int32), 8
    if case == "few-experts":  # 61 of 64 experts get nothing; int64 ids
        return torch.tensor([2, 7, 40])[torch.randint(0, 3, (29, 2))], 64
    if case == "k=E":
        return torch.rand(5, 16).argsort(-1).int(), 16
    if case == "no-tokens":
        return torch.empty(0, 8, dtype=torch.int32), 128
    raise ValueError(case)


CASES = ["random", "decode", "one-expert", "few-experts", "k=E", "no-tokens"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_layout(case, block_size):
    topk_ids, num_experts = _routing(case)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, block_size, num_experts)
    _check_invariants(topk_ids, block_size, num_experts, sorted_ids, expert_ids, num_post_padded)
    expected_sorted, expected_experts, expected_used = _plain_python(topk_ids, block_size, num_experts)
    assert sorted_ids.tolist() == expected_sorted
    assert expert_ids.tolist() == expected_experts
    assert num_post_padded.tolist() == [expected_used]


def test_docstring_example():
    topk_ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, 2, 4)
    assert sorted_ids.tolist() == [1, 4, 0, 2, 5, 6, 3, 6, 6, 6]
    assert expert_ids.tolist() == [0, 2, 2, 3, 0]
    assert num_post_padded.tolist() == [8]


def test_vllm_expert_map_and_pad_sorted_ids():
    """vLLM 0.10.1.1's options: expert_ids mapped through expert_map (every block: the trailing ones read
    expert_map[0]), sorted_token_ids lengthened with sentinels to a multiple of block_size; the rest unchanged."""
    topk_ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
    plain = moe_align_block_size(topk_ids, 2, 4)
    expert_map = torch.tensor([-1, 5, 0, 1], dtype=torch.int32)
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, 2, 4, expert_map=expert_map)
    assert torch.equal(sorted_ids, plain[0]) and torch.equal(total, plain[2])
    assert expert_ids.tolist() == expert_map[plain[1].long()].tolist() == [-1, 0, 0, 1, -1]
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, 4, 4, pad_sorted_ids=True)
    unpadded = moe_align_block_size(topk_ids, 4, 4)[0]  # 6 + 4 * 3 = 18 entries -> 20
    assert sorted_ids.tolist() == unpadded.tolist() + [6, 6] and expert_ids.numel() == 5 and total.tolist() == [12]


def test_int32_and_int64_ids_agree():
    topk_ids = torch.rand(20, 61).argsort(-1)[:, :6]
    for a, b in zip(moe_align_block_size(topk_ids, 16, 61), moe_align_block_size(topk_ids.int(), 16, 61), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_buffer_bound_is_tight(block_size):
    """Every expert with one pair: the bound N + min(E, N) * (block_size - 1) is reached exactly."""
    topk_ids = torch.arange(12, dtype=torch.int32).view(3, 4)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, block_size, 12)
    assert num_post_padded.item() == sorted_ids.numel() == 12 * block_size
    assert expert_ids.tolist() == list(range(12))


# --- bad input: named, value-bearing errors from qwen_fast.moe_align_block_size --------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"topk_ids": torch.zeros(3, 2)}, TypeError, "topk_ids must be int32 or int64, got torch.float32"),
        (
            {"topk_ids": torch.zeros(6, dtype=torch.int32)},
            ValueError,
            r"topk_ids must have 2 dimensions, got shape \(6,\)",
        ),
        ({"block_size": 0}, ValueError, r"block_size must be in \[1, inf\], got 0"),
        ({"block_size": 16.0}, TypeError, "block_size must be an int, got float"),
        ({"num_experts": 0}, ValueError, r"num_experts must be in \[1, inf\], got 0"),
        ({"num_experts": 3}, ValueError, r"topk_ids must lie in \[0, 3\) \(num_experts=3\), got ids in \[0, 7\]"),
        ({"topk_ids": torch.tensor([[0, -1]], dtype=torch.int32)}, ValueError, r"got ids in \[-1, 0\]"),
        ({"expert_map": torch.zeros(8)}, TypeError, "expert_map must be int32, got torch.float32"),
        ({"expert_map": torch.zeros(7, dtype=torch.int32)}, ValueError, r"expert_map must be \[num_experts\] = \[8\]"),
        (
            {"expert_map": torch.full((8,), -2, dtype=torch.int32)},
            ValueError,
            r"local expert ids >= -1 .*got \[-2, -2\]",
        ),
        ({"pad_sorted_ids": 1}, TypeError, "pad_sorted_ids must be a bool, got int 1"),
    ],
)
def test_moe_align_block_size_bad_input(kwargs, error, message):
    args = {"topk_ids": torch.tensor([[0, 7], [3, 5], [1, 2]], dtype=torch.int32), "block_size": 4, "num_experts": 8}
    with pytest.raises(error, match=message):
        qwen_fast.moe_align_block_size(**(args | kwargs))


# --- kernels: every backend against the reference on every sample is tests/test_ops.py; here their own paths ------


def _random_ids(num_tokens: int, num_experts: int, topk: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[T, k] distinct experts per token."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=gen).argsort(-1)[:, :topk].to(dtype)


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_moe_align_cpu_many_tiles(dtype, block_size):
    """T*k = 102,400 ids: 7 tiles of the CPU kernel (16,384 ids each), half of them on one expert."""
    topk_ids = _random_ids(12800, 128, 8, dtype, seed=3)
    topk_ids[::2, 0] = 7
    with qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as calls:
        got = qwen_fast.moe_align_block_size(topk_ids, block_size, 128)
    assert calls == [("moe_align_block_size", "cpu")]
    for g, e in zip(got, moe_align_block_size(topk_ids, block_size, 128), strict=True):
        assert torch.equal(g, e)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,num_experts", [(4096, 128), (1500, 4096), (40000, 256)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_moe_align_cuda_multi_pass(num_tokens, num_experts, block_size):
    """T*k past the fused path's 8192 ids: the count, prefix and scatter kernels (many blocks, bases in shared
    memory; E = 4096 leaves 3 warps a block, T = 40000 tiles of more than 64 ids) equal the reference bit for bit,
    with half of the tokens' first choice on one expert."""
    topk_ids = _random_ids(num_tokens, num_experts, 8, torch.int32, seed=7)
    topk_ids[::2, 0] = 7
    got = torch.ops.qwen_fast.moe_align_block_size(topk_ids.cuda(), block_size, num_experts)
    for g, e in zip(got, moe_align_block_size(topk_ids, block_size, num_experts), strict=True):
        assert torch.equal(g.cpu(), e)


@pytest.mark.gpu
def test_moe_align_cuda_graph_and_deterministic():
    topk_ids = _random_ids(512, 128, 8, torch.int32).cuda()
    first = torch.ops.qwen_fast.moe_align_block_size(topk_ids, 16, 128)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.qwen_fast.moe_align_block_size(topk_ids, 16, 128)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(first, captured, strict=True):
            assert torch.equal(a, b)


def test_moe_align_native_op_checks():
    ids = torch.tensor([[0, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, 3\), got 3 at flat index 1"):
        torch.ops.qwen_fast.moe_align_block_size(ids, 4, 3)
    with pytest.raises(RuntimeError, match=r"num_experts must be in \[1, 4096\], got 5000"):
        torch.ops.qwen_fast.moe_align_block_size(ids, 4, 5000)
    with pytest.raises(RuntimeError, match="block_size must be >= 1, got 0"):
        torch.ops.qwen_fast.moe_align_block_size(ids, 0, 8)
    with pytest.raises(RuntimeError, match="topk_ids must be int32 or int64, got Float"):
        torch.ops.qwen_fast.moe_align_block_size(ids.float(), 4, 8)


# --- choose_block_size ---------------------------------------------------------------------------------------------


def test_choose_block_size_rule():
    """BLOCK_M holds the rows of the busiest experts (at most T an expert; binomial mean + 2 sd), not the mean."""
    from qwen_fast.ops.moe_align import choose_block_size

    assert choose_block_size(1, 8, 128) == 16  # decode: one row on each of 8 experts
    assert choose_block_size(0, 8, 128) == 16
    assert choose_block_size(64, 8, 8) == 64  # k = E: every expert gets exactly T rows
    assert choose_block_size(65, 8, 8) == 128
    # mean 16 rows an expert, but about half get more: 16 + 2 * sqrt(16 * (1 - 1/16)) = 23.7 rows
    assert choose_block_size(256, 8, 128) == 32
    assert choose_block_size(10**6, 8, 128) == 128
    assert choose_block_size(64, 1, 1) == 64  # one expert takes every row
    sizes = [choose_block_size(t, 8, 128) for t in range(0, 5000, 7)]
    assert sizes == sorted(sizes) and set(sizes) <= {16, 32, 64, 128}


@pytest.mark.parametrize("num_tokens", [64, 256, 512, 1024])
def test_choose_block_size_holds_the_busy_experts(num_tokens):
    """Under uniform routing (Qwen3-30B-A3B: E = 128, k = 8) at most 5% of the experts need a second block; with
    the mean rows per expert as the block size about half of them would."""
    from qwen_fast.ops.moe_align import choose_block_size

    counts = torch.bincount(_random_ids(num_tokens, 128, 8, torch.int32, seed=5).flatten(), minlength=128)
    assert (counts > choose_block_size(num_tokens, 8, 128)).float().mean() <= 0.05
    assert (counts > num_tokens * 8 // 128).float().mean() >= 0.3


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 16])
@pytest.mark.parametrize("num_experts,topk", [(128, 8), (64, 8), (8, 2)])
def test_choose_block_size_decode_padding(num_tokens, num_experts, topk):
    """At decode the padding stays under 15 rows per active expert."""
    from qwen_fast.ops.moe_align import choose_block_size

    block_size = choose_block_size(num_tokens, topk, num_experts)
    topk_ids = _random_ids(num_tokens, num_experts, topk, torch.int32)
    _, _, total = moe_align_block_size(topk_ids, block_size, num_experts)
    active = topk_ids.unique().numel()
    if num_tokens * topk <= 16 * min(num_experts, num_tokens * topk):
        assert block_size == 16
        assert total.item() - topk_ids.numel() <= active * 15


def test_choose_block_size_bad_input():
    from qwen_fast.ops.moe_align import choose_block_size

    with pytest.raises(ValueError, match=r"topk must be in \[1, inf\], got 0"):
        choose_block_size(4, 0, 128)
    with pytest.raises(TypeError, match="num_tokens must be an int, got float"):
        choose_block_size(4.0, 8, 128)
