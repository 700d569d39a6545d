"""The per-step plan of a PagedKVCache: what every attention layer of one forward reads, made once per step.

One forward (a prefill or a decode step) appends S_new tokens to sequences 0 .. B - 1 of the cache. Its first
attention layer calls `qwen_fast_cache::plan_step`, an opaque op whose implementation runs the block allocator (Python,
host) at run time: it reserves the pages the new tokens need (per sequence, from the length that sequence holds),
writes the changed block-table entries and the new lengths into the cache's fixed device tensors in place, and
returns the slots of the new tokens. Every later layer of the step reads the same plan.

Why an op: torch.compile traces the model's forward but not an op's implementation, so a compiled decode step sees one
node with fixed-shape device tensors in and out (block_table [max_batch, W], seq_lens [max_batch], slots
[B * S_new]) and never guards on the allocator's Python state: it compiles once and replays for every token, across
page boundaries. (vLLM keeps its attention metadata out of the traced graph in the same spirit.) The op mutates the
tables it is given (`Tensor(a!)` in its schema), so nothing reorders it against the layers that read them. It runs
host code, so a CUDA graph must not capture it: it is tagged `cudagraph_unsafe`, which inductor's graph partition
keeps outside the captured partitions.

Caches are found by an integer handle (an op takes no Python objects); the registry holds them weakly.
"""

import itertools
import weakref

import torch

_CACHES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()

_LIB = torch.library.Library("qwen_fast_cache", "DEF")
_LIB.define(
    "plan_step(int handle, int batch, int num_new, Tensor(a!) block_table, Tensor(b!) seq_lens) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)


def register(cache: object) -> int:
    """A handle for `cache` (a PagedKVCache), valid while the cache lives."""
    handle = next(_HANDLES)
    _CACHES[handle] = cache
    return handle


def _plan_step(handle: int, batch: int, num_new: int, block_table: torch.Tensor, seq_lens: torch.Tensor):
    cache = _CACHES.get(handle)
    if cache is None:
        raise ValueError(f"qwen_fast_cache::plan_step: no live PagedKVCache has handle {handle}")
    # Write only the tables given: under torch.compile they may be copies (functionalization keeps the value an
    # earlier read of the graph saw), and the graph writes them back into the cache's own after the step.
    return cache._plan(batch, num_new, block_table, seq_lens)


def _plan_step_fake(handle, batch, num_new, block_table, seq_lens):
    torch._check(block_table.dim() == 2 and seq_lens.dim() == 1, lambda: "block_table [N, W] and seq_lens [N]")
    torch._check(batch <= seq_lens.shape[0], lambda: f"batch {batch} exceeds the cache's rows {seq_lens.shape[0]}")
    return block_table.new_empty(batch * num_new, dtype=torch.int64)


_LIB.impl("plan_step", _plan_step, "CompositeExplicitAutograd")
torch.library.register_fake("qwen_fast_cache::plan_step", _plan_step_fake, lib=_LIB)


def plan_step(cache, batch: int, num_new: int) -> torch.Tensor:
    """Reserve positions len_b .. len_b + num_new - 1 of sequences b = 0 .. batch - 1 of `cache` and return their
    slots, int64 [batch * num_new] (b-major) on the cache's device; the cache's block_table and seq_lens (its device
    tensors) then hold the new pages and lengths."""
    return torch.ops.qwen_fast_cache.plan_step(cache._handle, batch, num_new, cache._block_table, cache._seq_lens)
