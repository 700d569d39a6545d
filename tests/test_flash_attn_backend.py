"""The optional flash_attn backend without flash-attn: a stand-in module in sys.modules proves the selection (CUDA
only, auto's first choice where its constraints allow, the next backend where not), the argument mapping and the
report. flash-attn itself cannot be installed on the machines that run this suite."""

import sys
import types

import pytest
import torch

import qwen_fast
from qwen_fast.ops import FLASH_ATTN, FLASH_ATTN_VARLEN, FLASH_ATTN_WITH_KVCACHE, reread_environment

CUDA = torch.device("cuda")


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A module named flash_attn whose three functions record their arguments and return tensors of the shapes
    flash-attn returns (out, and with the lse flag (out, lse[, S_dmask]))."""
    calls = []

    def dense(q, k, v, *args, return_attn_probs=False, **kwargs):
        calls.append(("flash_attn_func", (q, k, v, *args), kwargs | {"return_attn_probs": return_attn_probs}))
        out = torch.full_like(q, 2.0)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), 3.0)
        return (out, lse, q.new_empty(0)) if return_attn_probs else out

    def varlen(q, k, v, *args, return_attn_probs=False, **kwargs):
        calls.append(("flash_attn_varlen_func", (q, k, v, *args), kwargs | {"return_attn_probs": return_attn_probs}))
        out = torch.full_like(q, 2.0)
        return (out, torch.full((q.shape[1], q.shape[0]), 3.0), q.new_empty(0)) if return_attn_probs else out

    def with_kvcache(q, k_cache, v_cache, k=None, v=None, *args, return_softmax_lse=False, **kwargs):
        calls.append(("flash_attn_with_kvcache", (q, k_cache, v_cache, k, v, *args),
                      kwargs | {"return_softmax_lse": return_softmax_lse}))  # fmt: skip
        out = torch.full_like(q, 2.0)
        return (out, torch.full((q.shape[0], q.shape[2], q.shape[1]), 3.0)) if return_softmax_lse else out

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func, module.flash_attn_with_kvcache = dense, varlen, with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    reread_environment()  # forget the cached choices made without it
    yield calls
    monkeypatch.delitem(sys.modules, "flash_attn")
    reread_environment()


def test_selected_on_cuda_only_where_importable(fake_flash_attn):
    for op in (FLASH_ATTN, FLASH_ATTN_VARLEN, FLASH_ATTN_WITH_KVCACHE):
        assert op.problem("flash_attn", CUDA) is None
        assert op.select(CUDA) == "flash_attn"
        assert op.select(torch.device("cpu")) != "flash_attn"
        assert "runs CUDA tensors" in op.problem("flash_attn", torch.device("cpu"))
    assert qwen_fast.backends()["flash_attn_func"]["flash_attn"] in ("installed; no CUDA device here", "usable on cuda")
    assert qwen_fast.backends()["fused_topk"]["flash_attn"] == "not implemented"


def test_not_importable_means_triton_on_cuda():
    reread_environment()
    assert "flash-attn is not importable" in FLASH_ATTN.problem("flash_attn", CUDA)
    assert FLASH_ATTN.select(CUDA) == "triton"
    assert "flash-attn is not importable" in qwen_fast.backends()["flash_attn_func"]["flash_attn"]


def test_never_runs_cpu_tensors(fake_flash_attn):
    q, k, v = torch.randn(1, 3, 4, 64), torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64)
    with qwen_fast.record_backends() as calls:
        qwen_fast.flash_attn_func(q, k, v, causal=True)
    assert calls == [("flash_attn_func", "cpu")] and fake_flash_attn == []
    with qwen_fast.use_backend("flash_attn"), pytest.raises(RuntimeError, match="runs CUDA tensors"):
        qwen_fast.flash_attn_func(q, k, v)


@pytest.mark.parametrize("return_lse", [False, True])
def test_dense_and_varlen_arguments_pass_through(fake_flash_attn, return_lse):
    q, k, v = (torch.randn(2, 5, h, 64, dtype=torch.bfloat16) for h in (8, 2, 2))
    with qwen_fast.record_backends() as calls:
        out, lse = FLASH_ATTN(CUDA, q, k, v, 0.125, True, 7, 0, 30.0, return_lse)
    assert calls == [("flash_attn_func", "flash_attn")]
    name, args, kwargs = fake_flash_attn[0]
    assert name == "flash_attn_func" and args[0] is q and args[1] is k and args[2] is v
    expected = {"dropout_p": 0.0, "softmax_scale": 0.125, "causal": True, "window_size": (7, 0), "softcap": 30.0}
    assert kwargs == expected | {"return_attn_probs": return_lse}
    assert torch.equal(out, torch.full_like(q, 2.0))
    assert lse.shape == ((2, 8, 5) if return_lse else (0,)) and lse.dtype == torch.float32

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    rows_q, rows_kv = torch.randn(10, 8, 64, dtype=torch.float16), torch.randn(10, 2, 64, dtype=torch.float16)
    out, lse = FLASH_ATTN_VARLEN(CUDA, rows_q, rows_kv, rows_kv, cu, cu, 6, 6, 0.125, False, -1, -1, 0.0, return_lse)
    name, args, kwargs = fake_flash_attn[1]
    assert name == "flash_attn_varlen_func" and args[3] is cu and args[5:7] == (6, 6)
    assert kwargs["window_size"] == (-1, -1) and kwargs["causal"] is False
    assert lse.shape == ((8, 10) if return_lse else (0,))


def _paged(block_size: int, dtype=torch.bfloat16):
    q = torch.randn(2, 1, 8, 128, dtype=dtype)
    caches = [torch.zeros(4, block_size, 2, 128, dtype=dtype) for _ in range(2)]
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return q, *caches, torch.tensor([5, 300], dtype=torch.int32), table


def test_kvcache_arguments_pass_through(fake_flash_attn):
    q, k_cache, v_cache, seqlens, table = _paged(256)
    with qwen_fast.record_backends() as calls:
        out, lse = FLASH_ATTN_WITH_KVCACHE(CUDA, q, k_cache, v_cache, None, None, seqlens, table, None, True, (-1, -1),
                                           None, None, 0.0, 3, True, max_seqlen_k=301)  # fmt: skip
    assert calls == [("flash_attn_with_kvcache", "flash_attn")] and lse.shape == (2, 8, 1)
    name, args, kwargs = fake_flash_attn[0]
    assert args[0] is q and args[1] is k_cache and args[2] is v_cache and args[3] is None
    assert kwargs["cache_seqlens"] is seqlens and kwargs["block_table"] is table and kwargs["num_splits"] == 3
    assert kwargs["causal"] is True and kwargs["window_size"] == (-1, -1) and kwargs["return_softmax_lse"] is True


@pytest.mark.parametrize(
    "change, reason",
    [
        ("page16", "block_size % 256 == 0, got block_size 16"),
        ("fp32", "float16/bfloat16, got torch.float32"),
        ("fp8", "no fp8 cache"),
    ],
)
def test_kvcache_outside_its_constraints_runs_triton_or_refuses(fake_flash_attn, monkeypatch, change, reason):
    """Auto goes on to the next backend of the order (triton, replaced here by a recorder: no GPU); forcing the
    flash_attn backend names the constraint."""
    q, k_cache, v_cache, seqlens, table = _paged(16 if change == "page16" else 256,
                                                 torch.float32 if change == "fp32" else torch.bfloat16)  # fmt: skip
    descale = torch.ones(2, 2) if change == "fp8" else None
    ran = []
    monkeypatch.setitem(FLASH_ATTN_WITH_KVCACHE.impls, "triton", lambda *a, **kw: ran.append(a) or a[0])
    args = (q, k_cache, v_cache, None, None, seqlens, table, None, True, (-1, -1))
    with qwen_fast.record_backends() as calls:
        FLASH_ATTN_WITH_KVCACHE(CUDA, *args, k_descale=descale, v_descale=descale)
    assert calls == [("flash_attn_with_kvcache", "triton")] and len(ran) == 1 and fake_flash_attn == []
    with qwen_fast.use_backend("flash_attn"), pytest.raises(RuntimeError, match=reason):
        FLASH_ATTN_WITH_KVCACHE(CUDA, *args, k_descale=descale, v_descale=descale)


def test_dense_head_dim_outside_its_constraints_runs_triton(fake_flash_attn, monkeypatch):
    q, k, v = (torch.randn(1, 3, 2, 260, dtype=torch.float16) for _ in range(3))
    monkeypatch.setitem(FLASH_ATTN.impls, "triton", lambda *a: (a[0], a[0].new_empty(0)))
    with qwen_fast.record_backends() as calls:
        FLASH_ATTN(CUDA, q, k, v, 0.1, False, -1, -1, 0.0, False)
    assert calls == [("flash_attn_func", "triton")] and fake_flash_attn == []
