"""Dispatch overhead: the same tiny op call through the public function (checks + dispatch), through the Op entry
(the unchecked, dispatched call that qwen_fast.nn and qwen_fast.cache make) and as a raw torch.ops call (no Python
of qwen_fast at all), on the cpu backend (auto's choice for CPU tensors).

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_dispatch.py --benchmark-columns=median,ops

The tensors are tiny (a few tokens, a few experts), so the kernels cost about a microsecond and the rest is host
overhead: speedup = raw torch.ops time / this row's time (1.0 = no overhead). extra_info: op, shape ("tiny"),
impl ("qwen_fast.cpu public", "qwen_fast.cpu Op entry", "torch.ops"), baseline "torch.ops", us per call, device.
fused_moe has no op of its own: its raw row is the two torch.ops calls it is made of (fused_topk, fused_experts).

The timings run on one intra-op thread: the tensors are tiny, and on a busy machine the wake-up of a thread pool
(milliseconds when other processes hold the cores) would swamp the microseconds measured here.

A second group times the registration itself with a Python body that does nothing: a torch.library.Library
define + impl (what the Triton ops use) against a torch.library.custom_op, each called through torch.ops.
The Triton backend is not timed here: under TRITON_INTERPRET=1 the numpy interpreter dominates, so its overhead
means nothing on CPU.
"""

import pytest
import torch

import qwen_fast
from qwen_fast import _native, ops

pytestmark = pytest.mark.skipif(_native.LOAD_ERROR is not None, reason="needs the C++ extension (cpu backend)")

CPU = torch.device("cpu")
IMPLS = ("qwen_fast.cpu public", "qwen_fast.cpu Op entry", "torch.ops")


def _cases() -> dict:
    """op -> (public call, Op entry call, raw torch.ops call), each a no-argument callable."""
    native = torch.ops.qwen_fast
    gating = torch.randn(2, 8)
    ids = torch.randint(0, 8, (2, 2), dtype=torch.int32)
    weights = torch.rand(2, 2)
    x, w13, w2 = torch.randn(2, 16), torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    q3, k3, v3 = q[0], k[0], v[0]
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    key_cache, value_cache = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    new_k, new_v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    seqlens, table = torch.tensor([3], dtype=torch.int32), torch.tensor([[1, 2]], dtype=torch.int32)
    slots = torch.tensor([5])
    cos_sin = qwen_fast.reference.compute_cos_sin_cache(16, 32, 1e6)
    positions, norm = torch.tensor([3]), torch.ones(16)
    routing = ("softmax", None, None, None, 1.0, "max")
    moe_routing = {"scoring_func": "softmax", "e_score_correction_bias": None, "num_expert_group": None,
                   "topk_group": None, "routed_scaling_factor": 1.0, "group_scoring": None}  # fmt: skip
    moe_options = {"custom_routing_function": None, "inplace": False, "expert_map": None}
    scale = 0.25
    rope_args = (q3[:1], k3[:1], v3[:1], norm, norm, 1e-6, positions, cos_sin, key_cache, value_cache, slots, True)
    return {
        "fused_topk": (
            lambda: qwen_fast.fused_topk(x, gating, 2),
            lambda: ops.FUSED_TOPK(CPU, gating, 2, True),
            lambda: native.fused_topk(gating, 2, True, *routing),
        ),
        "moe_align_block_size": (
            lambda: qwen_fast.moe_align_block_size(ids, 16, 8),
            lambda: ops.MOE_ALIGN_BLOCK_SIZE(CPU, ids, 16, 8),
            lambda: native.moe_align_block_size(ids, 16, 8),
        ),
        "fused_experts": (
            lambda: qwen_fast.fused_experts(x, w13, w2, weights, ids),
            lambda: ops.FUSED_EXPERTS(CPU, x, w13, w2, weights, ids),
            lambda: native.fused_experts(x, w13, w2, weights, ids),
        ),
        "fused_moe": (
            lambda: qwen_fast.fused_moe(x, w13, w2, gating, 2),
            lambda: ops.FUSED_MOE(CPU, x, w13, w2, gating, 2, True, moe_options, moe_routing),
            lambda: native.fused_experts(x, w13, w2, *native.fused_topk(gating, 2, True, *routing)),
        ),
        "flash_attn_varlen_func": (
            lambda: qwen_fast.flash_attn_varlen_func(q3[:1], k3, v3, cu_q, cu_k, 1, 3, causal=True),
            lambda: ops.FLASH_ATTN_VARLEN(CPU, q3[:1], k3, v3, cu_q, cu_k, 1, 3, scale, True, -1, -1, 0.0, False),
            lambda: native.flash_attn_varlen_func(q3[:1], k3, v3, cu_q, cu_k, 1, 3, scale, True, -1, -1, 0.0, False),
        ),
        "flash_attn_with_kvcache": (
            lambda: qwen_fast.flash_attn_with_kvcache(
                q, key_cache, value_cache, new_k, new_v, cache_seqlens=seqlens, block_table=table, causal=True
            ),
            lambda: ops.FLASH_ATTN_WITH_KVCACHE(
                CPU, q, key_cache, value_cache, new_k, new_v, seqlens, table, None, True, (-1, -1)
            ),
            lambda: native.flash_attn_with_kvcache(
                q, key_cache, value_cache, new_k, new_v, seqlens, table, None, scale, -1, 0, 0.0, 0, None, None
            ),
        ),
        "reshape_and_cache": (
            lambda: qwen_fast.reshape_and_cache(k3[:1], v3[:1], key_cache, value_cache, slots),
            lambda: ops.RESHAPE_AND_CACHE(CPU, k3[:1], v3[:1], key_cache, value_cache, slots),
            lambda: native.reshape_and_cache(k3[:1], v3[:1], key_cache, value_cache, slots),
        ),
        "rotary_embedding": (
            lambda: qwen_fast.rotary_embedding(positions, q3[:1], k3[:1], q3.shape[-1], cos_sin, True),
            lambda: ops.ROTARY_EMBEDDING(CPU, positions, q3[:1], k3[:1], cos_sin, True),
            lambda: native.rotary_embedding(positions, q3[:1], k3[:1], cos_sin, True),
        ),
        "qk_norm_rope_and_cache": (
            lambda: qwen_fast.qk_norm_rope_and_cache(*rope_args),
            lambda: ops.QK_NORM_ROPE_AND_CACHE(CPU, *rope_args),
            lambda: native.qk_norm_rope_and_cache(*rope_args),
        ),
    }


CASES = _cases()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(CASES))
def test_dispatch_overhead(benchmark, op, impl):
    call = CASES[op][IMPLS.index(impl)]
    with qwen_fast.record_backends() as calls:
        call()
    assert impl == "torch.ops" or (op, "cpu") in calls  # the row times the cpu backend
    benchmark(call)
    benchmark.extra_info.update(
        device="cpu", op=f"dispatch {op}", shape="tiny", impl=impl, baseline="torch.ops",
        us=benchmark.stats["median"] * 1e6,
    )  # fmt: skip


# --- the registration alone: Library define + impl against custom_op, a body that does nothing --------------------

_LIB = torch.library.Library("qwen_fast_bench", "FRAGMENT")
_LIB.define("noop_library(Tensor x) -> Tensor")
_LIB.impl("noop_library", lambda x: x.new_empty(0), "CompositeExplicitAutograd")


@torch.library.custom_op("qwen_fast_bench::noop_custom_op", mutates_args=())
def _noop_custom_op(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


REGISTRATIONS = {
    "torch.library.Library": lambda x: torch.ops.qwen_fast_bench.noop_library(x),
    "torch.library.custom_op": lambda x: torch.ops.qwen_fast_bench.noop_custom_op(x),
    "python (no registration)": lambda x: x.new_empty(0),
}


@pytest.mark.parametrize("impl", list(REGISTRATIONS))
def test_registration_overhead(benchmark, impl):
    x = torch.zeros(4)
    benchmark(REGISTRATIONS[impl], x)
    benchmark.extra_info.update(
        device="cpu", op="registration", shape="one tensor in, one out", impl=impl,
        baseline="python (no registration)", us=benchmark.stats["median"] * 1e6,
    )  # fmt: skip
