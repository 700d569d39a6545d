"""The functional API: input checks at the boundary, then per-call backend dispatch (see _dispatch.py)."""

from ._dispatch import BACKENDS, Op, forced_backend, record_backends, use_backend
from .kv_cache import RESHAPE_AND_CACHE, reshape_and_cache

# Every public op, by name: what qwen_fast.backends() reports on.
OPS: dict[str, Op] = {op.name: op for op in (RESHAPE_AND_CACHE,)}

__all__ = [
    "BACKENDS",
    "OPS",
    "Op",
    "forced_backend",
    "record_backends",
    "reshape_and_cache",
    "use_backend",
]
