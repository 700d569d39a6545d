"""Paged KV cache: BlockAllocator (free list + reference counts), PagedKVPool (per-layer page pools and block
tables) and PagedKVCache (a PagedKVPool that is a transformers Cache; imported on first use, as it needs
transformers)."""

from .block_allocator import BlockAllocator, OutOfBlocksError
from .paged_kv_pool import PagedKVPool


def __getattr__(name: str):
    if name == "PagedKVCache":
        from .paged_kv_cache import PagedKVCache

        return PagedKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BlockAllocator", "OutOfBlocksError", "PagedKVCache", "PagedKVPool"]
