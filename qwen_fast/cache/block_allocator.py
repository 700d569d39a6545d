"""BlockAllocator: the free list and reference counts behind a paged KV cache (host-side bookkeeping only).

A paged cache is a pool of `num_blocks` pages (qwen_fast/reference/kv_cache.py). The allocator hands out page ids;
it never touches page contents. Each page has a reference count: the number of sequences whose block table lists
it. Sequences that share a prefix list the same pages (`share` adds a reference); a page returns to the free list
when its count drops to 0 (`free`). A sequence about to write into a page it shares first swaps it for a fresh page
(`make_writable`, copy-on-write); the caller copies the page contents in every layer's pools.

The same scheme as vLLM's and nano-vllm's block managers (written here from the description, without hashing).
"""

from collections import Counter, deque
from collections.abc import Iterable

from qwen_fast.ops._checks import check_int


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs. Nothing was allocated or changed."""


class BlockAllocator:
    """Free list + per-block reference counts for `num_blocks` pages with ids 0 .. num_blocks - 1.

    Example:
        >>> allocator = BlockAllocator(4)
        >>> a = allocator.allocate(2); a
        [0, 1]
        >>> allocator.share(a); allocator.refcount(0), allocator.num_free
        (2, 2)
        >>> table = list(a); allocator.make_writable(table, [1])  # (src, dst): copy page 1 into page 2
        [(1, 2)]
        >>> table, allocator.refcount(1)
        ([0, 2], 1)
        >>> allocator.free(a); allocator.free(table); allocator.num_free
        4
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = check_int("num_blocks", num_blocks, low=1)
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        """How many block tables list `block` (0: it is free)."""
        return self._refs[self._check_block(block)]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (reference count 1 each). Raises OutOfBlocksError, changing nothing, if fewer are
        free."""
        check_int("n", n, low=0)
        if n > len(self._free):
            raise OutOfBlocksError(
                f"out of KV cache blocks: asked for {n}, {len(self._free)} free of {self.num_blocks} in total "
                "(free finished sequences, or size the cache with a larger num_blocks)"
            )
        blocks = [self._free.popleft() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one reference to each (allocated) block: another sequence now lists it too."""
        blocks = list(blocks)
        for block in blocks:
            if self._refs[self._check_block(block)] == 0:
                raise ValueError(f"cannot share block {block}: it is free (allocate it first)")
        for block in blocks:
            self._refs[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference per listed block; a block whose count reaches 0 goes back to the free list. Freeing a
        block more times than it is referenced is a ValueError, raised before anything changes."""
        counts = Counter(self._check_block(block) for block in blocks)
        for block, count in counts.items():
            if count > self._refs[block]:
                state = "already free" if self._refs[block] == 0 else f"referenced {self._refs[block]} times"
                raise ValueError(f"cannot free block {block} {count} times: it is {state} (double free?)")
        for block, count in counts.items():
            self._refs[block] -= count
            if self._refs[block] == 0:
                self._free.append(block)

    def make_writable(self, table: list[int], indices: Iterable[int]) -> list[tuple[int, int]]:
        """Copy-on-write: in `table` (one sequence's block list, mutated), replace each block at `indices` that
        other tables share (reference count > 1) by a fresh block. Returns the (src, dst) pairs whose page contents
        the caller must copy. Raises OutOfBlocksError, changing nothing, when too few blocks are free."""
        shared = [i for i in indices if self._refs[self._check_block(table[i])] > 1]
        fresh = self.allocate(len(shared))
        pairs = []
        for i, dst in zip(shared, fresh, strict=True):
            pairs.append((table[i], dst))
            self._refs[table[i]] -= 1  # still > 0: the other tables keep it
            table[i] = dst
        return pairs

    def _check_block(self, block: object) -> int:
        return check_int("block", block, low=0, high=self.num_blocks - 1)
