"""PagedKVCache: a PagedKVPool that is also a transformers `Cache`, so `model.generate(..., cache=...)` (called
`past_key_values=` before transformers 5.24) keeps the keys and values in pages.

Batch row b of the model's input is sequence b of the pool (claimed on first use). Every layer's `update(key_states
[B, Hkv, S_new, D], value_states)` writes the new tokens into the pages with qwen_fast.reshape_and_cache and returns
that layer's keys and values [B, Hkv, S_total, D] gathered back from the pages, so transformers' own attention
(eager, sdpa) runs unchanged; like DynamicCache, the padding tokens of a left-padded batch are stored too and the
attention mask hides them. An attention module that reads the pages directly (flash_attn_with_kvcache) uses
`key_caches[layer]`, `value_caches[layer]`, `block_table` and `seq_lens` instead (see PagedKVPool).

Each forward has one step plan (StepPlan, made by layer 0 through the opaque op in step_plan.py): it reserves the new
tokens' pages for the whole batch (all layers share the block table) and every layer writes into the same slots. A
cache built for a model patched by qwen_fast is compileable: the patched attention reads only the plan's fixed-shape
device tensors, so `generate(..., compile_config=...)` or torch.compile over a decode loop compiles the step once.
Beam search works: `reorder_cache` makes each beam share the pages of the beam it continues (copy-on-write on the
next write into a shared page). Sliding-window layers are not supported. An OutOfBlocksError inside generate() may
leave the batch's sequences at different lengths: reset() the cache before using it again.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

from qwen_fast.ops import RESHAPE_AND_CACHE
from qwen_fast.ops._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor

from . import step_plan
from .paged_kv_pool import PagedKVPool, to_device

DEFAULT_POOL_BYTES = 4 << 30
"""`for_model`'s cap on the pools' total size (all layers, keys and values) when num_blocks is not given."""


@dataclass
class StepPlan:
    """What the attention layers of one forward read from a PagedKVCache, made by the first of them (layer 0).

    slots: int64 [B * S_new], the new tokens' cache slots (b-major), for the cache write.
    block_table: int32 [B, W] and seq_lens: int32 [B], the cache's device tensors (rows 0 .. B - 1) after the
        plan: flash_attn_with_kvcache's block_table and cache_seqlens (lengths including the new tokens).
    batch, num_new: B and S_new.
    rope: whatever per-step RoPE facts the first layer derived (qwen_fast.nn.GQAAttention keeps its table and
        positions here), reused by the others.
    """

    slots: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    batch: int
    num_new: int
    rope: tuple | None = None


class PagedCacheLayer(CacheLayerMixin):
    """One layer's view of a PagedKVCache: the number of tokens the step plan gave it (the pages are the cache's)."""

    is_sliding = False
    is_croppable = True  # PagedKVCache.crop rolls the pages back exactly (assisted decoding needs it)

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx, self.length = cache, layer_idx, 0

    @property
    def is_compileable(self) -> bool:
        return self.cache.compileable

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._check_states(key_states, value_states)
        self.cache._materialize(key_states.device, key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write key_states/value_states [B, Hkv, S_new, D] after what sequences 0 .. B - 1 hold (all the same length
        L); return this layer's keys and values [B, Hkv, L + S_new, D] read from the pages."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.cache._write_batch(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling():  # no host state in a traced step: a flash-style mask ignores the sizes
            return self.cache.max_blocks_per_seq * self.cache.block_size, 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens this layer holds; while torch.compile traces, sequence 0's length as a 0-d device tensor (as
        transformers' StaticCache), so that no compiled step depends on host state."""
        if torch.compiler.is_compiling():
            return self.cache._seq_lens[0]
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

    def __init__(self, *args, compileable: bool = False, **kwargs):
        PagedKVPool.__init__(self, *args, **kwargs)
        Cache.__init__(self, layers=[PagedCacheLayer(self, i) for i in range(self.num_layers)])
        self.compileable = bool(compileable)
        self._handle = step_plan.register(self)
        self._step: StepPlan | None = None
        self._step_layers: set[int] = set()  # layers that read the current plan (eager check of the plan's age)
        self._step_starts: list[int] = []  # what each sequence held before the current plan (host)

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
        compileable: bool | None = None,
    ) -> "PagedKVCache":
        """A cache sized from `model.config` (its text config): num_hidden_layers, num_key_value_heads, head_dim
        (or hidden_size // num_attention_heads), max_position_embeddings (the default max_seq_len). Under tensor
        parallelism (a model loaded with `tp_plan` or a `DistributedConfig`) each rank holds its own KV heads, as
        transformers' `get_kv_heads_per_rank` says; heads that do not split evenly are a ValueError.

        num_blocks=None: enough pages for max_batch sequences of max_seq_len tokens each, but no more than fit in
        DEFAULT_POOL_BYTES (4 GiB) over all layers' key and value pools (at least one page); pass num_blocks to size
        it yourself. device and dtype default to the model's. A config with sliding-window layers is a ValueError.

        compileable (`is_compileable`, which makes `generate` compile its decode step when asked to, and by default on
        CUDA): default True when `model` is patched by qwen_fast (its attention modules read the pages in place, and a
        decode step is then one fixed-shape graph), False otherwise (transformers' attention reads the keys that
        `update` gathers, whose length grows every step).
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
        heads_kv = _kv_heads_per_rank(model, config.num_key_value_heads)
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
        if compileable is None:
            from qwen_fast.nn import GQAAttention

            compileable = any(isinstance(module, GQAAttention) for module in model.modules())
        return cls(
            config.num_hidden_layers, heads_kv, head_dim, max_batch, max_seq_len, num_blocks, block_size, device, dtype,
            compileable=compileable,
        )  # fmt: skip

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

    def plan_layer(self, layer: int, batch: int, num_new: int) -> StepPlan:
        """The step plan for attention layer `layer` of a forward that appends `num_new` tokens to sequences
        0 .. batch - 1: layer 0 makes it (qwen_fast_cache::plan_step reserves the pages, see step_plan.py), every other
        layer reads it. For attention modules that write and read the pages themselves (qwen_fast.nn.GQAAttention:
        the cache write at `slots`, then flash_attn_with_kvcache over `block_table` and `seq_lens`)."""
        if layer == 0:
            slots = step_plan.plan_step(self, batch, num_new)
            self._step = StepPlan(slots, self._block_table[:batch], self._seq_lens[:batch], batch, num_new)
            if not torch.compiler.is_compiling():
                self._step_layers = {0}
            return self._step
        plan = self._step
        if not torch.compiler.is_compiling():
            if plan is None or (plan.batch, plan.num_new) != (batch, num_new) or layer in self._step_layers:
                raise ValueError(
                    f"layer {layer} appends {num_new} tokens to {batch} sequences but the cache holds no plan for it: "
                    "layer 0 plans each step, so every forward must run layer 0 first and each layer once"
                )
            self._step_layers.add(layer)
        return plan

    def _plan(self, batch: int, num_new: int, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Host side of plan_step: reserve positions len_s .. len_s + num_new - 1 of sequences s < batch (claimed on
        first use), mirror the tables into `block_table` and `seq_lens` (the device tables the op was given);
        returns the slots, int64 [batch * num_new] on the device."""
        check_int("batch", batch, low=0, high=self.max_batch)
        check_int("num_new", num_new, low=0)
        for seq in range(batch):
            if self._tables[seq] is None:
                self._tables[seq], self._lens[seq] = [], 0
                self._set_row(seq)
        self._step_starts = [self._lens[seq] for seq in range(batch)]
        for seq in range(batch):
            self.reserve(seq, num_new)
        self._flush(block_table, seq_lens)
        if batch:
            longest = max(self._step_starts) + num_new
            for entry in self.layers:
                entry.length = max(entry.length, longest)
        positions = torch.tensor(self._step_starts, dtype=torch.int64)[:, None] + torch.arange(num_new)
        pages = self._host_block_table[:batch].long().gather(1, positions // self.block_size)
        return to_device((pages * self.block_size + positions % self.block_size).view(-1), block_table.device)

    def _write_batch(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write key_states/value_states [B, Hkv, S_new, D] after what sequences 0 .. B - 1 hold (one length L for
        all); return the layer's keys and values [B, Hkv, L + S_new, D] read back from the pages. While torch.compile
        traces, the keys of every block-table column instead ([B, Hkv, W * block_size, D], one shape every step, as a
        StaticCache returns its whole buffer; get_mask_sizes says the same width, so the mask hides what is unwritten):
        correct, but it reads the whole width per layer; a step without padding reads the pages in place instead."""
        batch, heads_kv, new, head_dim = key_states.shape
        plan = self.plan_layer(layer, batch, new)
        if torch.compiler.is_compiling():
            end = self.max_blocks_per_seq * self.block_size
        else:
            self._check_states(key_states, value_states)
            start = self._step_starts[0] if batch else 0
            if any(held != start for held in self._step_starts):
                raise ValueError(
                    f"the batch's sequences hold {self._step_starts} tokens: transformers' attention needs one length "
                    "for all (the cache was changed outside generate(), or use qwen_fast.patch, whose attention reads "
                    "each sequence's own length)"
                )
            end = start + new
        key_rows, value_rows = (
            states.transpose(1, 2).reshape(batch * new, heads_kv, head_dim).contiguous()
            for states in (key_states, value_states)
        )
        RESHAPE_AND_CACHE(key_rows.device, key_rows, value_rows, self.key_caches[layer], self.value_caches[layer],
                          plan.slots)  # fmt: skip
        pages = plan.block_table[:, : -(-end // self.block_size)].long()
        keys, values = self.gather_pages(layer, pages, end)  # [B, end, Hkv, D]
        return keys.transpose(1, 2), values.transpose(1, 2)

    def reset(self) -> None:
        """Free every sequence (the pools stay allocated) and forget what each layer has seen."""
        self.free_all()
        Cache.reset(self)
        self._step = None
        self._flush()  # a compiled step reads the device lengths before its plan (get_seq_length)

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
        self._flush()

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
        self._flush()


def _kv_heads_per_rank(model: torch.nn.Module, heads: int) -> int:
    """The KV heads this rank's attention modules hold: all of them, or 1/tp of them under tensor parallelism."""
    tp_size = getattr(model, "tp_size", None) or 1
    if tp_size == 1:
        return heads
    local = get_kv_heads_per_rank(model.tp_plan, heads, tp_size)
    if local is None:
        raise ValueError(f"num_key_value_heads={heads} does not split evenly over tp_size={tp_size} ranks")
    return local
