"""Backend selection: auto, forcing by context manager and environment, and the errors when a forced backend
cannot run. Nothing falls back silently."""

import pytest
import torch

import qwen_fast
from qwen_fast.ops import OPS, Op, record_backends, use_backend
from qwen_fast.ops._dispatch import NATIVE_FIRST


def _demo_op() -> Op:
    return Op("demo", {"cpu": lambda x: ("cpu", x), "torch": lambda x: ("torch", x)}, NATIVE_FIRST)


def _kv_inputs():
    key = torch.randn(3, 2, 8)
    cache = torch.zeros(2, 4, 2, 8)
    return key, key.clone(), cache, cache.clone(), torch.tensor([0, 5, -1])


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    with record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "cpu")]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_use_backend_forces_and_restores(backend):
    with use_backend(backend), record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    with record_backends() as after:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", backend)]
    assert after == [("reshape_and_cache", "cpu")]


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("QWEN_FAST_BACKEND", "torch")
    with record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "torch")]


def test_context_manager_wins_over_environment(monkeypatch):
    monkeypatch.setenv("QWEN_FAST_BACKEND", "torch")
    with use_backend("cpu"), record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "cpu")]


def test_unknown_backend_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of .*got 'gpu'"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv("QWEN_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="QWEN_FAST_BACKEND must be one of .*got 'fast'"):
        qwen_fast.reshape_and_cache(*_kv_inputs())


def test_forcing_a_missing_backend_names_the_op_and_what_it_has():
    op = _demo_op()
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"demo has no triton backend \(it has: cpu, torch\)"):
        op(torch.device("cpu"), 1)


def test_forcing_cuda_on_cpu_tensors_is_an_error():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="runs cuda tensors, got cpu tensors.*Usable for cpu"):
        qwen_fast.reshape_and_cache(*_kv_inputs())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        qwen_fast.reshape_and_cache(*_kv_inputs())


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = Op("demo", {"triton": lambda: "triton", "torch": lambda: "torch"}, NATIVE_FIRST)
    assert op(torch.device("cpu")) == "torch"


def test_backends_reports_every_op_and_backend():
    table = qwen_fast.backends()
    assert set(table) == set(OPS)
    for name, row in table.items():
        assert set(row) == set(qwen_fast.ops.BACKENDS)
        assert row["torch"] == "usable on cpu", name
    assert table["reshape_and_cache"]["cpu"] == "usable on cpu"
    text = qwen_fast.ops.report.format_backends(table)
    assert text.splitlines()[0].split() == ["op", "cuda", "triton", "cpu", "torch"]
