"""PagedKVCache: a PagedKVPool that is also a transformers `Cache`, so `model.generate(..., cache=...)` (called
`past_key_values=` before transformers 5.24) keeps the keys and values in pages.

Batch row b of the model's input is sequence b of the pool (claimed on first use). Every layer's `update(key_states
[B, Hkv, S_new, D], value_states)` writes the new tokens into the pages with qwen_fast.reshape_and_cache and returns
that layer's keys and values [B, Hkv, S_total, D] gathered back from the pages, so transformers' own attention
(eager, sdpa) runs unchanged; like DynamicCache, the padding tokens of a left-padded batch are stored too and the
attention mask hides them. An attention module that reads the pages directly (flash_attn_with_kvcache) uses
`key_caches[layer]`, `value_caches[layer]`, `block_table` and `seq_lens` instead (see PagedKVPool).

The first layer to see new tokens reserves their pages for the whole batch (all layers share the block table); the
other layers write into the same slots. Beam search works: `reorder_cache` makes each beam share the pages of the
beam it continues (copy-on-write on the next write into a shared page). Sliding-window layers are not supported.
An OutOfBlocksError inside generate() may leave the batch's sequences at different lengths: reset() the cache
before using it again.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from qwen_fast.ops import reshape_and_cache
from qwen_fast.ops._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor

from .paged_kv_pool import PagedKVPool

DEFAULT_POOL_BYTES = 4 << 30
"""`for_model`'s cap on the pools' total size (all layers, keys and values) when num_blocks is not given."""


class PagedCacheLayer(CacheLayerMixin):
    """One layer's view of a PagedKVCache: the number of tokens this layer has written (the pages are the cache's)."""

    is_sliding = False
    is_croppable = True  # PagedKVCache.crop rolls the pages back exactly (assisted decoding needs it)

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx, self.length = cache, layer_idx, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._check_states(key_states, value_states)
        self.cache._materialize(key_states.device, key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write key_states/value_states [B, Hkv, S_new, D] at positions length .. length + S_new - 1 of sequences
        0 .. B - 1; return this layer's keys and values [B, Hkv, length + S_new, D] read from the pages."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.cache._write_batch(self.layer_idx, key_states, value_states, self.length)
        self.length += key_states.shape[2]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.cache.max_seq_len

    def reset(self) -> None:
        self.length = 0


class PagedKVCache(PagedKVPool, Cache):
    """Paged K/V pools + block allocator + block tables (PagedKVPool), usable as a transformers Cache.

    Args: those of PagedKVPool (num_layers, num_kv_heads, head_dim, max_batch, max_seq_len, num_blocks, block_size,
    device, dtype); `for_model` reads them from a model's config.

    Example (a tiny random Qwen3-MoE; greedy decoding gives the tokens DynamicCache gives):
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        ...     num_experts_per_tok=2, max_position_embeddings=64)
        >>> model = Qwen3MoeForCausalLM(config).eval()
        >>> cache = PagedKVCache.for_model(model, max_batch=2, block_size=4)
        >>> prompt = torch.randint(64, (2, 5))
        >>> out = model.generate(prompt, cache=cache, max_new_tokens=6, do_sample=False)
        >>> torch.equal(out, model.generate(prompt, max_new_tokens=6, do_sample=False))
        True
        >>> cache.block_table[:, :3].tolist(), cache.seq_lens.tolist()  # 10 tokens each: 3 pages of 4 slots
        ([[0, 1, 4], [2, 3, 5]], [10, 10])
    """

    def __init__(self, *args, **kwargs):
        PagedKVPool.__init__(self, *args, **kwargs)
        Cache.__init__(self, layers=[PagedCacheLayer(self, i) for i in range(self.num_layers)])
        self._batch_memo: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        max_batch: int,
        block_size: int = 16,
        num_blocks: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
    ) -> "PagedKVCache":
        """A cache sized from `model.config` (its text config): num_hidden_layers, num_key_value_heads, head_dim
        (or hidden_size // num_attention_heads), max_position_embeddings (the default max_seq_len).

        num_blocks=None: enough pages for max_batch sequences of max_seq_len tokens each, but no more than fit in
        DEFAULT_POOL_BYTES (4 GiB) over all layers' key and value pools (at least one page); pass num_blocks to size
        it yourself. device and dtype default to the model's. A config with sliding-window layers is a ValueError.
        """
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model with a .config, got {type(model).__name__}")
        config = model.config.get_text_config(decoder=True)
        # As transformers infers layer types: `layer_types` if the config has it, else sliding when sliding_window
        # is set (Qwen3 and Qwen3-MoE set it to None unless use_sliding_window).
        layer_types = (
            getattr(config, "layer_types", None)
            or ["sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"]
            * config.num_hidden_layers
        )
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"PagedKVCache supports full-attention layers only; this config's layer types are {layer_types} "
                "(sliding-window or other layers): use transformers' DynamicCache for this model"
            )
        heads_kv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
        check_int("max_seq_len", max_seq_len, low=1)
        check_int("block_size", block_size, low=1)
        device = next(model.parameters()).device if device is None else device
        dtype = next(model.parameters()).dtype if dtype is None else dtype
        if num_blocks is None:
            if dtype not in FLOAT_DTYPES:
                raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
            page_bytes = 2 * config.num_hidden_layers * block_size * heads_kv * head_dim * dtype.itemsize
            wanted = check_int("max_batch", max_batch, low=1) * -(-max_seq_len // block_size)
            num_blocks = max(1, min(wanted, DEFAULT_POOL_BYTES // page_bytes))
        return cls(
            config.num_hidden_layers, heads_kv, head_dim, max_batch, max_seq_len, num_blocks, block_size, device, dtype
        )

    def _check_states(self, key_states: object, value_states: object) -> None:
        check_tensor("key_states", key_states, ndim=4, dtypes=FLOAT_DTYPES)
        batch, _, new, _ = key_states.shape
        check_shape("key_states", key_states, (batch, self.num_kv_heads, new, self.head_dim), "[B, Hkv, S_new, D] =")
        check_tensor("value_states", value_states, dtypes=(key_states.dtype,), device=key_states.device)
        check_shape("value_states", value_states, key_states.shape, "key_states' shape")
        if batch > self.max_batch:
            raise ValueError(f"key_states has batch {batch} > the cache's max_batch={self.max_batch}")
        if self.dtype is not None and key_states.dtype != self.dtype:
            raise TypeError(f"key_states must be the cache's dtype {self.dtype}, got {key_states.dtype}")
        if self.device is not None and key_states.device != self.device:
            raise ValueError(f"key_states must be on the cache's device {self.device}, got {key_states.device}")

    def _write_batch(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, start: int):
        """Write key_states/value_states [B, Hkv, S_new, D] at positions start .. end - 1 of sequences 0 .. B - 1;
        return the layer's keys and values [B, Hkv, end, D] read back from the pages."""
        self._check_states(key_states, value_states)
        batch, heads_kv, new, head_dim = key_states.shape
        end = start + new
        self._reserve_batch(layer, batch, start, end)
        pages, slots = self._batch_pages(batch, start, end)
        key_rows, value_rows = (
            states.transpose(1, 2).reshape(batch * new, heads_kv, head_dim).contiguous()
            for states in (key_states, value_states)
        )
        reshape_and_cache(key_rows, value_rows, self.key_caches[layer], self.value_caches[layer], slots)
        keys, values = self.gather_pages(layer, pages, end)  # [B, end, Hkv, D]
        return keys.transpose(1, 2), values.transpose(1, 2)

    def reserve_layer(self, layer: int, key_states: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """For an attention module that writes and reads the pages itself (qwen_fast.nn.GQAAttention through
        flash_attn_with_kvcache): reserve positions L .. L + S_new - 1 of sequences 0 .. B - 1 for `layer`, where L is
        what the layer holds, count them as written, and return (L, block_table[:B], slots): flash_attn_with_kvcache's
        cache_seqlens and block_table, and the int64 [B * S_new] slots of the new tokens (b-major) for a cache write.
        key_states [B, S_new, Hkv, D] (flash-attn's layout) fixes the pools' device
        and dtype on first use; nothing is written here."""
        entry = self.layers[self._check_layer(layer)]
        states = key_states.transpose(1, 2)
        if not entry.is_initialized:
            entry.lazy_initialization(states, states)
        self._check_states(states, states)
        start = entry.length
        batch, end = states.shape[0], start + states.shape[2]
        self._reserve_batch(layer, batch, start, end)
        entry.length = end
        return start, self.block_table[:batch], self._batch_pages(batch, start, end)[1]

    def _reserve_batch(self, layer: int, batch: int, start: int, end: int) -> None:
        """Sequences 0 .. B - 1 get positions start .. end - 1 (reserved by the first layer to get there)."""
        for seq in range(batch):
            if self._tables[seq] is None:
                self._tables[seq], self._lens[seq] = [], 0
            if self._lens[seq] < end:
                if self._lens[seq] != start:
                    raise ValueError(
                        f"layer {layer} writes positions {start} .. {end - 1} of seq {seq}, which holds "
                        f"{self._lens[seq]} tokens: the cache was changed outside generate()"
                    )
                self.reserve(seq, end - start)

    def _batch_pages(self, batch: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages int64 [batch, ceil(end / block_size)] of sequences 0 .. batch - 1 and the slots int64 [batch * (end -
        start)] of their positions start .. end - 1, computed on the device from block_table; reused by every layer
        until a table changes."""
        key = (batch, start, end, self.version)
        if self._batch_memo is None or self._batch_memo[0] != key:
            pages = self.block_table[:batch, : -(-end // self.block_size)].long()
            positions = torch.arange(start, end, device=self.device)
            slots = pages[:, positions // self.block_size] * self.block_size + positions % self.block_size
            self._batch_memo = (key, (pages, slots.view(-1)))
        return self._batch_memo[1]

    def reset(self) -> None:
        """Free every sequence (the pools stay allocated) and forget what each layer has seen."""
        self.free_all()
        Cache.reset(self)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `tokens_to_remove` tokens (an int <= 0, transformers 5.x's convention: crop(-n) removes n)
        of every layer and sequence; pages no longer needed return to the pool. The next forward continues from the
        shorter length (assisted decoding rolls back rejected draft tokens this way)."""
        if check_int("tokens_to_remove", tokens_to_remove) > 0:
            raise ValueError(
                f"tokens_to_remove must be <= 0 (crop(-n) removes n tokens, as transformers 5.x's Cache.crop), got "
                f"{tokens_to_remove}"
            )
        for layer in self.layers:
            layer.length = max(layer.length + tokens_to_remove, 0)
        length = max(layer.length for layer in self.layers)
        for seq in self.active_sequences():
            if self._lens[seq] > length:
                self.truncate(seq, length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b continues sequence beam_idx[b], sharing its pages (no copy until a write)."""
        rows = beam_idx.tolist()
        tables = [self.sequence_blocks(row) for row in rows]
        lengths = [self._lens[row] for row in rows]
        for table in tables:
            self.allocator.share(table)
        for seq, (table, length) in enumerate(zip(tables, lengths, strict=True)):
            self.allocator.free(self._tables[seq])
            self._tables[seq], self._lens[seq] = table, length
            self._set_row(seq)
