"""PagedKVPool: per-layer K/V page pools, a block allocator, and per-sequence block tables (no transformers needed).

Layout (qwen_fast/reference/kv_cache.py): each layer has a key pool and a value pool [num_blocks, block_size, Hkv,
D]; sequence s's position p lives in page block_table[s, p // block_size] at row p % block_size, i.e. in slot
block_table[s, p // block_size] * block_size + p % block_size. All layers share one block table: a sequence's
position p sits in the same slot of every layer's pools.

Host side (Python lists, the source of truth): each active sequence's block list and length. Device side, kept in
sync lazily: a change only marks its sequence; the first read of `block_table` or `seq_lens` after changes writes the
marked rows' changed entries into the host mirrors and the same entries into the device tensors (their addresses
never change, so a compiled or CUDA-graphed step can hold them), so a decode step of B sequences costs one lengths
copy, and a write of the new block table entries only when a page was added or dropped, not on every token:
    block_table  int32 [max_batch, max_blocks_per_seq]: row s lists sequence s's pages; unused entries are 0.
    seq_lens     int32 [max_batch]: tokens reserved per sequence (0 for an inactive row).

Blocks are allocated on demand: a sequence of n tokens holds ceil(n / block_size) pages, so it wastes less than one
page. `fork` shares every page of a sequence with a new one (reference counts); the first write into a shared,
partially filled last page copies that page first (copy-on-write, in every layer), so the other sequence never sees
it. Running out of pages raises OutOfBlocksError and changes nothing.

Serving-style use (the recipe a paged attention module follows), per step and sequence s with n new tokens:
    slots = pool.append(s, n)                            # reserve room; int64 [n] slots for reshape_and_cache
    for each layer l: pool.write(l, k_new, v_new, slots)  # or flash_attn_with_kvcache(q, pool.key_caches[l],
        pool.value_caches[l], k_new[None], v_new[None], cache_seqlens=pool.seq_lens[[s]] - n,
        block_table=pool.block_table[[s]]), which writes the new tokens itself
    pool.free(s) when the sequence is finished.
"""

import torch

from qwen_fast.ops import reshape_and_cache
from qwen_fast.ops._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor

from .block_allocator import BlockAllocator, OutOfBlocksError


class PagedKVPool:
    """K/V page pools for `num_layers` layers, shared block tables for up to `max_batch` sequences.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape (Hkv, D).
        max_batch: sequence ids are 0 .. max_batch - 1 (rows of block_table).
        max_seq_len: most tokens one sequence may hold; block_table has ceil(max_seq_len / block_size) columns.
        num_blocks: pages per pool.
        block_size: token slots per page.
        device, dtype: of the pools (dtype float32/float16/bfloat16) and tables. None: taken from the first keys
            written (`block_table` and `seq_lens` are CPU tensors until the device is known).

    Attributes:
        key_caches, value_caches: per layer [num_blocks, block_size, Hkv, D] (empty lists until dtype and device
            are known).
        allocator: the BlockAllocator.

    Example:
        >>> pool = PagedKVPool(1, 2, 8, max_batch=2, max_seq_len=64, num_blocks=8, block_size=4, dtype=torch.float32)
        >>> s = pool.add_sequence()
        >>> k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
        >>> pool.write(0, k, v, pool.append(s, 6))  # pages 0 and 1 (2 slots of page 1 used)
        >>> child = pool.fork(s)                      # shares both pages
        >>> pool.append(child, 1).tolist()            # its write into shared page 1 goes to a copy, page 2
        [10]
        >>> keys, _ = pool.gather(0, s); torch.equal(keys, k)
        True
        >>> pool.block_table[:2, :2].tolist(), pool.seq_lens.tolist()
        ([[0, 1], [0, 2]], [6, 7])
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_batch: int,
        max_seq_len: int,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.max_batch = check_int("max_batch", max_batch, low=1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self._tables: list[list[int] | None] = [None] * max_batch  # None: the row is not an active sequence
        self._lens = [0] * max_batch
        self._host_block_table = torch.zeros(max_batch, self.max_blocks_per_seq, dtype=torch.int32)
        self._host_rows: list[list[int]] = [[] for _ in range(max_batch)]  # what each host row holds before its 0s
        self._changed: set[int] = set()  # sequences whose block list or length changed since the last flush
        self._host_seq_lens = torch.zeros(max_batch, dtype=torch.int32)
        self._block_table, self._seq_lens = self._host_block_table, self._host_seq_lens
        self.version = 0  # bumped on every change of a block table or length
        self.device: torch.device | None = None
        self.dtype = dtype
        self.key_caches: list[torch.Tensor] = []
        self.value_caches: list[torch.Tensor] = []
        if device is not None:
            self._materialize(torch.device(device), dtype)

    # -- device state --------------------------------------------------------------------------------------------

    def _materialize(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Fix the device (tables move there) and the dtype; allocate the pools once both are known. The device
        tensors keep their addresses from then on (marked static for torch.compile's CUDA graphs)."""
        if self.device is None:
            self._flush()
            self.device = device
            self._block_table = self._host_block_table.to(device, copy=True)
            self._seq_lens = self._host_seq_lens.to(device, copy=True)
            _mark_static(self._block_table, self._seq_lens)
        if self.dtype is None:
            self.dtype = dtype
        if not self.key_caches and self.dtype is not None:
            shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
            self.key_caches = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
            self.value_caches = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
            _mark_static(*self.key_caches, *self.value_caches)

    @property
    def block_table(self) -> torch.Tensor:
        """int32 [max_batch, max_blocks_per_seq] on the device: row s lists sequence s's pages, then zeros."""
        self._flush()
        return self._block_table

    @property
    def seq_lens(self) -> torch.Tensor:
        """int32 [max_batch] on the device: tokens reserved per sequence (`append` counts them before they are
        written)."""
        self._flush()
        return self._seq_lens

    def _set_row(self, seq: int) -> None:
        """Sequence seq's block list or length changed: mark it for the next flush."""
        self._changed.add(seq)
        self.version += 1

    def _flush(self, block_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None) -> None:
        """Mirror the marked sequences' block lists (only the entries that differ) and all lengths into the host
        tables and the device tables (`block_table` and `seq_lens` when given: where a step plan writes them)."""
        block_table = self._block_table if block_table is None else block_table
        seq_lens = self._seq_lens if seq_lens is None else seq_lens
        if not self._changed:
            return
        rows, columns, values = [], [], []  # the block table entries to write, in one indexed assignment
        for seq in self._changed:
            table, held = self._tables[seq] or [], self._host_rows[seq]
            if table == held:
                continue
            same = min(len(table), len(held))
            if table[:same] != held[:same]:
                same = next(i for i, (new, old) in enumerate(zip(table[:same], held[:same], strict=True)) if new != old)
            end = max(len(table), len(held))
            rows += [seq] * (end - same)
            columns += range(same, end)
            values += table[same:] + [0] * (len(held) - len(table))  # zeros where the list got shorter
            self._host_rows[seq] = list(table)
        self._changed.clear()
        if rows:
            index = (torch.tensor(rows), torch.tensor(columns))
            entries = torch.tensor(values, dtype=torch.int32)
            self._host_block_table[index] = entries
            if block_table is not self._host_block_table:
                device = block_table.device
                block_table[tuple(to_device(i, device) for i in index)] = to_device(entries, device)
        lengths = torch.tensor(self._lens, dtype=torch.int32)
        self._host_seq_lens.copy_(lengths)
        if seq_lens is not self._host_seq_lens:
            seq_lens.copy_(to_device(lengths, seq_lens.device))

    # -- sequences -----------------------------------------------------------------------------------------------

    def _check_seq(self, seq: object, *, active: bool = True) -> int:
        check_int("seq", seq, low=0, high=self.max_batch - 1)
        if active and self._tables[seq] is None:
            raise ValueError(f"seq {seq} is not an active sequence (add_sequence or fork one first)")
        return seq

    def add_sequence(self) -> int:
        """Claim the lowest free sequence id (an empty sequence: no pages yet)."""
        for seq, table in enumerate(self._tables):
            if table is None:
                self._tables[seq], self._lens[seq] = [], 0
                self._set_row(seq)
                return seq
        raise ValueError(f"all max_batch={self.max_batch} sequence ids are in use (free one first)")

    def sequence_length(self, seq: int) -> int:
        return self._lens[self._check_seq(seq)]

    def sequence_blocks(self, seq: int) -> list[int]:
        """Sequence `seq`'s pages, in position order (a copy)."""
        return list(self._tables[self._check_seq(seq)])

    def active_sequences(self) -> list[int]:
        return [seq for seq, table in enumerate(self._tables) if table is not None]

    def reserve(self, seq: int, num_tokens: int) -> None:
        """Make room for `num_tokens` more tokens of `seq`: new pages on demand, and a private copy of a shared page
        the new tokens go into. Raises OutOfBlocksError (nothing changed) when too few pages are free."""
        table = self._tables[self._check_seq(seq)]
        check_int("num_tokens", num_tokens, low=0)
        old, new = self._lens[seq], self._lens[seq] + num_tokens
        if new > self.max_seq_len:
            raise ValueError(f"seq {seq} would hold {new} tokens, past max_seq_len={self.max_seq_len}")
        new_pages = -(-new // self.block_size) - len(table)
        # Only the partially filled last page can be shared and written: earlier pages are full, later ones new.
        written = [old // self.block_size] if num_tokens and old % self.block_size else []
        copies = sum(self.allocator.refcount(table[i]) > 1 for i in written)
        if new_pages + copies > self.allocator.num_free:
            raise OutOfBlocksError(
                f"out of KV cache blocks: seq {seq} needs {new_pages + copies} more to grow from {old} to {new} "
                f"tokens, {self.allocator.num_free} free of {self.num_blocks} in total (free finished sequences, "
                "or size the cache with a larger num_blocks)"
            )
        if copies:
            self._copy_pages(self.allocator.make_writable(table, written))
        if new_pages:
            table += self.allocator.allocate(new_pages)
        self._lens[seq] = new
        self._set_row(seq)

    def append(self, seq: int, num_tokens: int) -> torch.Tensor:
        """`reserve` room for `num_tokens` more tokens; returns their slots, int64 [num_tokens] on the device."""
        start = self._lens[self._check_seq(seq)]
        self.reserve(seq, num_tokens)
        return self.slot_mapping(seq, start, start + num_tokens)

    def slot_mapping(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions start .. end - 1 of `seq` (reserved ones), int64 [end - start] on the device."""
        table = self._tables[self._check_seq(seq)]
        check_int("start", start, low=0)
        check_int("end", end, low=start, high=self._lens[seq])
        pages = torch.tensor(table, dtype=torch.int64)
        positions = torch.arange(start, end)
        slots = pages[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device or "cpu")

    def truncate(self, seq: int, length: int) -> None:
        """Keep the first `length` tokens of `seq` (at most its length) and drop the rest: the pages past them lose
        this sequence's reference (and return to the free list unless another sequence shares them)."""
        table = self._tables[self._check_seq(seq)]
        check_int("length", length, low=0, high=self._lens[seq])
        keep = -(-length // self.block_size)
        self.allocator.free(table[keep:])
        del table[keep:]
        self._lens[seq] = length
        self._set_row(seq)

    def fork(self, seq: int) -> int:
        """A new sequence that shares all of `seq`'s pages (prefix sharing); returns its id. Either one's next write
        into the shared last page copies it first."""
        table = self._tables[self._check_seq(seq)]
        child = self.add_sequence()
        self.allocator.share(table)
        self._tables[child], self._lens[child] = list(table), self._lens[seq]
        self._set_row(child)
        return child

    def free(self, seq: int) -> None:
        """Finish `seq`: drop its references (pages nobody else lists go back to the free list); the id is free."""
        self.allocator.free(self._tables[self._check_seq(seq)])
        self._tables[seq], self._lens[seq] = None, 0
        self._set_row(seq)

    def free_all(self) -> None:
        for seq in self.active_sequences():
            self.free(seq)

    # -- page contents -------------------------------------------------------------------------------------------

    def _copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: page src -> page dst in every layer's pools."""
        if not pairs or not self.key_caches:
            return
        src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*pairs, strict=True))
        for cache in self.key_caches + self.value_caches:
            cache[dst] = cache[src]

    def _check_layer(self, layer: object) -> int:
        check_int("layer", layer, low=0, high=self.num_layers - 1)
        if not self.key_caches:
            raise ValueError("the pools are not allocated yet: give the cache a device and dtype, or write keys first")
        return layer

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write key/value [N, Hkv, D] (the pools' dtype) into `layer`'s pools at `slot_mapping` (int64 [N], from
        `append` or `slot_mapping`), through qwen_fast.reshape_and_cache."""
        if self.device is None or not self.key_caches:
            check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
            self._materialize(key.device, key.dtype)
        self._check_layer(layer)
        check_tensor("key", key, ndim=3, dtypes=(self.dtype,), device=self.device)
        check_shape("key", key, (key.shape[0], self.num_kv_heads, self.head_dim), "[N, Hkv, D] =")
        reshape_and_cache(key, value, self.key_caches[layer], self.value_caches[layer], slot_mapping)

    def gather(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence `seq`'s keys and values in `layer`, read from the pages: [length, Hkv, D] each (a copy)."""
        pages = torch.tensor(self.sequence_blocks(seq), dtype=torch.int64, device=self.device)
        return self.gather_pages(layer, pages, self._lens[seq])

    def gather_pages(self, layer: int, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of the sequences whose pages are `pages` (int64 [..., n], n * block_size >=
        length): keys and values [..., length, Hkv, D] of `layer`, read whole pages at a time (index_select, several
        times faster on CPU than indexing slot by slot)."""
        self._check_layer(layer)
        shape = (*pages.shape[:-1], pages.shape[-1] * self.block_size, self.num_kv_heads, self.head_dim)
        return tuple(
            cache.index_select(0, pages.reshape(-1)).view(shape)[..., :length, :, :]
            for cache in (self.key_caches[layer], self.value_caches[layer])
        )


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these tensors keep their addresses (CUDA graphs then read them in place; transformers'
    StaticCache does the same). Not while tracing, where it is not allowed."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh host tensor's copy on `device`. To CUDA from pinned memory without blocking: a copy from pageable
    memory would wait for the stream first (a host sync in the middle of a step); the caching host allocator keeps
    the pinned block until the copy is done."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
